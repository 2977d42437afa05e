"""The lectures' "depth matters" ablation: AlexNet with layers removed, on digits at 32x32.

One variant (the full net by default; any other with --config.model.remove):

    python -m cnn_lab.train --config=configs/alexnet_depth_ablation.py \\
        --workdir=runs/alexnet_depth_full

The ablation, the lectures' five variants times three seeds (fifteen runs, two at a time),
its parameter counts and its table:

    python -m cnn_lab.summary --config=configs/alexnet_depth_ablation.py --sweep
    python -m launch.sweep --config=configs/alexnet_depth_ablation.py \\
        --sweep_dir=runs/alexnet_depth --parallel=2
    python -m cnn_lab.report runs/alexnet_depth

The net is AlexNet's "compact" variant (conv1-5, fc6, fc7, fc8 as in Krizhevsky et al.
2012, widths halved from torchvision's and strides 1 for 32x32 input; 3.77M parameters,
83% of them in fc6 and fc7 as 80% are in the ImageNet net), trained with alexnet_digits'
recipe on the 1,212 training digits upsampled to 32x32. Removing a layer rewires the next
kept one to its input (`config.model.remove`; see cnn_lab.models.alexnet).

Expected: test accuracy (3 seeds each; 2 shared CPU cores, 73 minutes for the sweep)
0.9985 +- 0.0013 full, 0.9978 without fc7, 0.9956 +- 0.0038 without fc6 and fc7,
0.9985 without conv3 and conv4, 0.9978 without all four: digits are too easy for depth to
matter (docs/experiments.md, "Removing layers"). The lectures' ImageNet figures, quoted in the report's
last column: removing fc7 drops 16M parameters and costs 1.1% top-1, fc6 and fc7 about 50M
and 5.7%, conv3 and conv4 about 1M and 3.0%, all four 33.5%. `:smoke` trains for a few steps.
"""

from cnn_lab import sweep
from cnn_lab.configs import alexnet_digits

# The lectures' variants: label -> the layers removed.
VARIANTS = {
    "full": (),
    "-fc7": ("fc7",),
    "-fc6-fc7": ("fc6", "fc7"),
    "-conv3-conv4": ("conv3", "conv4"),
    "-conv3-conv4-fc6-fc7": ("conv3", "conv4", "fc6", "fc7"),
}
# The lecture's ImageNet results (Krizhevsky et al.'s net, retrained without the layers).
LECTURE = {
    "full": "62M parameters",
    "-fc7": "16M dropped, -1.1% top-1",
    "-fc6-fc7": "~50M dropped, -5.7% top-1",
    "-conv3-conv4": "~1M dropped, -3.0% top-1",
    "-conv3-conv4-fc6-fc7": "-33.5% top-1",
}


def get_config(mode: str | None = None):
    config = alexnet_digits.get_config(mode)
    config.model.variant = "compact"  # Five convs, fc6, fc7: the lectures' layer numbering.
    return config


def get_sweep() -> list[dict]:
    """The five variants (full first), seeds 0, 1, 2 each."""
    variants = [{"label": label, "model.remove": remove} for label, remove in VARIANTS.items()]
    return sweep.product(variants, sweep.seeds(3))


def get_report() -> dict:
    """What `python -m cnn_lab.report` adds: changes against the full net, the lecture's column."""
    return {"baseline": "full", "reference": {"title": "ImageNet (lecture)", **LECTURE}}
