"""An Optuna sweep that a rerun of its command finishes rather than restarts.

The study lives in the sweep directory (`storage: sqlite:///<sweep dir>/optuna.db`, a real
database). Rerunning the command lands in the same sweep directory (lmlab.run.sweep_resume) and this
sweeper loads the study: trials that finished count towards `n_trials`, and a trial cut off by the
kill is marked failed and asked again with the same parameters first, so its job folder is the same
and it resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        impl = self.sweeper
        Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # sqlite makes no folders
        if impl.storage:
            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # no study yet: a new sweep
                study = None
            if study is not None:
                cut_off = [t for t in study.trials if t.state == TrialState.RUNNING]
                for trial in cut_off:
                    study.tell(trial.number, state=TrialState.FAIL)
                    study.enqueue_trial(trial.params)
                done = sum(t.state == TrialState.COMPLETE for t in study.trials)
                impl.n_trials = max(0, impl.n_trials - done)
                impl.job_idx = len(study.trials)
                log.info("continuing study %s: %d trials done, %d to go", impl.study_name, done, impl.n_trials)
        return super().sweep(arguments)
