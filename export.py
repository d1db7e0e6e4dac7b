"""Export a trained model to a Hugging Face transformers directory (docs/export.md lists the families
that export, and to which transformers class).

python export.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt out=exported/my-model
python export.py ckpt=... out=... verify_checkpoint_hash=false  # a very large checkpoint: skip re-hashing its tensors
"""

import hydra
from omegaconf import DictConfig

from lmlab.cli import register_resolvers, user_errors
from lmlab.export import export_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@user_errors
def main(cfg: DictConfig) -> None:
    export_from_config(cfg)


if __name__ == "__main__":
    main()
