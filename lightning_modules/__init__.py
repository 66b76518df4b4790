"""LightningModules of every technique, the plain classifier, the data modules and the callbacks."""
