"""SAM-style promptable segmentation: model presets, training, evaluation and their KFP components."""
