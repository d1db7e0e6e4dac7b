"""lmlab's Hydra sweepers (Hydra finds plugins only under `hydra_plugins`).

`grid.ExtendingGridSweeper` (conf/hydra/sweeper/lmlab_grid.yaml, the default): the grid, then, with
`sweep.extend_grid=true`, one more learning rate for each pair whose best sits at the grid's edge.
Every module here is imported whenever Hydra starts (its plugin scan): heavy imports stay inside methods.
"""
