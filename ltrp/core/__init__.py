"""The pure-torch core: ViT blocks, the MAE, visible sets, leave-one-out scoring (and its reference
loop), the ranker, ranking losses and metrics, the baseline patch scorers, the kept-token classifier.
Imports torch and timm only: no Ray, no MLflow, no storage."""
