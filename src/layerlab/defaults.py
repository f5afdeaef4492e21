"""The commands' defaults, in one light module: the library functions and the CLI's options both read them here,
so ``--help`` shows the value the function uses, and neither keeps a copy. Each is cited where it is used."""

# analyze (layerlab.analysis.analyze)
ANALYZE_TOKENS = 8192  # tokens streamed through each model
SAMPLE_TOKENS = 1024  # the token sample: effective rank, intrinsic dimension, anisotropy
SAMPLE_SEQUENCES = 8  # whole sequences: prompt entropy, curvature
REMOVAL_TOKENS = 2048  # tokens for the layer-removal measurement (one extra forward per block)

# prune (layerlab.compress.prune)
MEASURE_TOKENS = 8192  # tokens the choosing metric reads

# quantize (layerlab.compress.quantize)
QUANT_WIDTHS = (2, 3, 4, 8)
QUANT_GROUP = 64
CALIBRATION_TOKENS = 4096

# convert --to no-norm (layerlab.compress.convert)
CONVERT_STEPS = 200  # GPT-2 small takes 300 steps of 2^19 tokens in Baroni et al.; a tiny model needs far fewer
CONVERT_LR = 3e-4  # constant after a linear warmup; Baroni et al. use 6e-4 (GPT-2 small) down to 1e-4 (XL)
