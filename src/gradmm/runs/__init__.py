"""What a run leaves and finds: its identity (the hash that names its directory), the job directory,
the manifest of finished stages, the target cache, atomic files, the summary metrics and sweeps."""
