"""Search spaces: op names (`candidates`), ops, the NAS-Bench-201 and DARTS supernets; `build.build_supernet`
makes the one a config names. Importing a submodule imports nothing else (`candidates` needs no torch)."""
