"""cryostack's science core: Fourier conventions, CTF, projection, reconstruction, FSC and pose search.

Every function here takes arrays and returns arrays; none sees a path, a bucket or a client.
"""
