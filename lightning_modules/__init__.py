"""LightningModules of every technique, the plain classifier, the data modules and the callbacks."""

from lightning_modules.run_folder import register_resolvers

# configs/hydra/default.yaml names run folders with these resolvers, so they must exist
# before Hydra composes a config, in train.py, sample.py, scripts and tests alike.
register_resolvers()
