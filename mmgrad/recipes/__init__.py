"""Training recipes on real multimodal data: loaders (UCI mfeat, AV-digits), models, the training
loop of every method, metrics (linear probes, Shapley contributions), the comparison report and the
``mmgrad`` command line (``mmgrad compare``, ``mmgrad train``; also ``python -m mmgrad``).

Importing this package is cheap: matplotlib and tqdm are imported only when a report or a progress
bar is made.
"""

from mmgrad.recipes.data import MultiViewData, MultiViewSplit, load_avdigits, load_dataset, load_mfeat
from mmgrad.recipes.metrics import gap_closed, linear_probe, shapley_accuracy, shapley_values
from mmgrad.recipes.models import ConvEncoder, MLPEncoder, MultimodalNet, build_model
from mmgrad.recipes.train import MethodSpec, TrainConfig, parse_method, run_one

__all__ = [
    "MultiViewData", "MultiViewSplit", "load_dataset", "load_mfeat", "load_avdigits",
    "MLPEncoder", "ConvEncoder", "MultimodalNet", "build_model",
    "MethodSpec", "TrainConfig", "parse_method", "run_one",
    "linear_probe", "shapley_values", "shapley_accuracy", "gap_closed",
]
