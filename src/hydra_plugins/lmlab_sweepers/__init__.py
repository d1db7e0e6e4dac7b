"""lmlab's Hydra sweepers (Hydra finds plugins only under `hydra_plugins`).

`grid.ExtendingGridSweeper` (conf/hydra/sweeper/lmlab_grid.yaml, the default): the grid, then, with
`sweep.extend_grid=true`, one more learning rate for each pair whose best sits at the grid's edge.
`optuna.ResumableOptunaSweeper` (hparams_search=optuna): an Optuna study kept in the sweep directory that a
rerun of the command continues to its `n_trials` instead of starting again.
Every module here is imported whenever Hydra starts (its plugin scan): heavy imports stay inside methods.
"""
