"""One `import vlunet` registers every name the option files and tools use."""
import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY


def test_all_names_registered():
    for name in ('VLUNet', 'Restormer', 'PromptIR', 'DGUNet', 'DGUNetPlus', 'DegradationCLIP'):
        assert name in ARCH_REGISTRY, name
    for name in ('VLUNetModel', 'CLIPAdapterModel'):
        assert name in MODEL_REGISTRY, name
    assert 'DegradationContrastiveLoss' in LOSS_REGISTRY
    assert 'AllInOneDataset' in DATASET_REGISTRY
    # BasicSR's own entries are still there
    assert {'MSRResNet', 'SRModel', 'L1Loss', 'PairedImageDataset'} <= (
        set(ARCH_REGISTRY.keys()) | set(MODEL_REGISTRY.keys()) | set(LOSS_REGISTRY.keys())
        | set(DATASET_REGISTRY.keys()))
