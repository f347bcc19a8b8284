"""`cryostack simulate`: write a simulated particle dataset with ground truth to the object store or a folder."""

from __future__ import annotations

import argparse
import sys
import time

SCENARIO_NAMES = ("floppy", "three-state", "hinge")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `simulate` subcommand."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate particles with ground truth (STAR + MRCS + true maps)",
        description=(
            "Simulate cryo-EM particle images of a hinged phantom protein (or of a given map) with known poses, "
            "shifts, defocus and conformations, and write particles.star, particles.mrcs, ground_truth/ and "
            "simulation.json under OUT (an s3://bucket/prefix, using the CRYOSTACK_S3_* settings, or a folder)."
        ),
    )
    parser.add_argument("--scenario", choices=SCENARIO_NAMES, required=True,
                        help="floppy: hinge 0-60 deg, 30%% domain missing, preferred orientation; three-state: "
                             "closed, open, domain absent, uniform poses; hinge: continuous hinge, uniform poses")
    parser.add_argument("--particles", type=int, required=True, metavar="N", help="number of particles")
    parser.add_argument("--box", type=int, required=True, metavar="D", help="box size in pixels")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="A",
                        help="pixel size in Å (default 3.0, or the map's, rescaled to the box, with --map)")
    parser.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default 0.1)")
    parser.add_argument("--map", default=None, metavar="M.mrc",
                        help="use this map (local file or s3:// URI) instead of the built-in phantom")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    parser.add_argument("--out", required=True, metavar="OUT", help="s3://bucket/prefix or a local folder")
    parser.set_defaults(func=run)


def _progress(done: int, total: int, started: float) -> None:
    """One status line on stderr, rewritten in place on a terminal."""
    elapsed = time.monotonic() - started
    line = f"simulated {done}/{total} particles ({100 * done / total:.0f}%, {elapsed:.1f} s)"
    if sys.stderr.isatty():
        print(f"\r{line}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Build the simulator from the arguments, write the dataset and print where it went."""
    from cryostack.config import ObjectStoreSettings  # noqa: PLC0415  (heavy imports only when the command runs)
    from cryostack.core.phantom import MapPhantom, resize_volume  # noqa: PLC0415
    from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario  # noqa: PLC0415
    from cryostack.errors import CryostackError, InvalidArgumentError  # noqa: PLC0415
    from cryostack.io.dataset import write_simulated_dataset  # noqa: PLC0415
    from cryostack.io.mrc import read_mrc, read_mrc_file  # noqa: PLC0415
    from cryostack.io.objectstore import ObjectStore  # noqa: PLC0415

    store = None
    needs_store = args.out.startswith("s3://") or (args.map or "").startswith("s3://")
    try:
        if needs_store:
            store = ObjectStore(ObjectStoreSettings())
        source = None
        source_description = "built-in blob phantom"
        pixel_size_a = args.pixel_size if args.pixel_size is not None else 3.0
        if args.map:
            loaded = read_mrc(store, args.map) if args.map.startswith("s3://") else read_mrc_file(args.map)
            volume = loaded.data
            if volume.ndim != 3 or len(set(volume.shape)) != 1:
                raise InvalidArgumentError("map", f"{args.map} is not a cubic map: shape {volume.shape}")
            # Resampling keeps the physical box, so the pixel size scales with the box ratio.
            map_pixel_a = loaded.header.voxel_size_a[0] * volume.shape[0] / args.box
            if args.pixel_size is not None and abs(args.pixel_size - map_pixel_a) > 1e-3 * map_pixel_a:
                reason = f"{args.pixel_size} Å disagrees with the map's {map_pixel_a:.4f} Å at box {args.box}"
                raise InvalidArgumentError("pixel-size", reason)
            pixel_size_a = map_pixel_a
            source = MapPhantom(resize_volume(volume, args.box))
            source_description = f"map {args.map}"
        params = SimulationParameters(n_particles=args.particles, box_px=args.box, pixel_size_a=pixel_size_a,
                                      snr=args.snr, seed=args.seed)
        simulator = ParticleSimulator(scenario(args.scenario), params, source=source)
        started = time.monotonic()
        dataset = write_simulated_dataset(
            simulator, args.out, store, progress=lambda done, total: _progress(done, total, started),
            source_description=source_description,
        )
    except CryostackError as error:
        print(f"cryostack simulate: {error}", file=sys.stderr)
        return 2
    finally:
        if store is not None:
            store.close()
    print(f"wrote {dataset.n_particles} particles ({args.scenario}, SNR {args.snr}) to {dataset.location}")
    print(f"particles: {dataset.particles_star}")
    return 0
