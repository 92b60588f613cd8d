"""The domain: what the product is about, below the stages, models and backends (docs/design.md, "Layers").

card     the card geometry, rendering and card spec (render templates and parse patterns)
dataset  labelled and unlabelled card datasets: labels.csv or class folders, the stratified split
synth    the class generative models, the synthetic card generator and TDA augmentation
"""
