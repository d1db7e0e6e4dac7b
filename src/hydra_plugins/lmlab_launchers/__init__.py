"""lmlab's Hydra launchers (Hydra finds plugins only under `hydra_plugins`).

`local_gpus.LocalGPUsLauncher` (hydra/launcher=local_gpus): a sweep's jobs on every GPU of one
machine, `jobs_per_gpu` at a time on each. Hydra imports this package whenever it starts (its
plugin scan), so heavy imports stay inside methods.
"""
