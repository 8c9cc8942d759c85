"""Fine-tuning heads on frozen backbone features: `vfm finetune train | eval | publish`.

config.py / values.py the configs of train and eval (every default, every check) and the value checks
cli.py                the flags of those configs, and the commands
data.py / splits.py   images and labels (ImageFolder, CSV, idx) and seeded stratified splits
extractors.py         a zoo backbone's embed(), or raw pixels, as a feature extractor
features.py           batched extraction with an on-disk cache (features_ray.py: Ray Data at scale)
loader.py             DataLoader workers that read and resize the images while the backbone runs
stacked.py / train.py one head per (learning rate, weight decay) in one pass; sgd, gd and lbfgs; resume
evaluate.py / report.py  accuracy, per-class scores, confusion, the Hoeffding bound; report.md + plots
pipeline.py / runs.py    the train command end to end; eval and publish of a run folder
The heads themselves and their artifact live in ``vfm.models.heads`` so the service can load them.
"""
