"""What a measurement ran with, recorded beside its numbers (``metrics.json``, per validation set).

PSNR/SSIM of the same weights on the same images can move with the software and the hardware:
scikit-image changed SSIM's defaults between releases, OpenCV and Pillow decode some files
differently, torch's kernels and TF32 differ between devices, mixed precision and tiled inference
change the output. :func:`environment` records those facts::

    {'versions': {'python': '3.11.9', 'numpy': '2.2.6', 'scikit-image': '0.26.0', 'torch': '2.14.1',
                  'opencv': '4.12.0', 'pillow': '11.3.0', 'basicsr': '1.4.2', 'vlunet': '0.1.0'},
     'device': 'cpu (16 threads)',            # or 'cuda:0 NVIDIA H100 80GB HBM3 (CUDA 12.8, cuDNN 91002)'
     'device_type': 'cpu',
     'precision': 'fp32',                     # or 'bf16 autocast' / 'fp16 autocast'
     'tiling': 'none',                        # or 'tile 512, overlap 32'
     'tf32': {'matmul': False, 'cudnn': True}, 'cudnn_benchmark': True, 'deterministic': False}

:data:`METRIC_KEYS` names the entries that can change a metric; :func:`environment_differences`
lists how two recorded environments differ in them (the leaderboard prints it under its tables).
"""
import platform
from typing import Dict, List, Optional

__all__ = ['environment', 'environment_differences', 'describe_environment', 'METRIC_KEYS', 'package_versions']

# entries that can change a PSNR/SSIM (compared between folders); the others are informative
METRIC_KEYS = ('versions.scikit-image', 'versions.numpy', 'versions.torch', 'versions.opencv', 'versions.pillow',
               'device_type', 'precision', 'tiling', 'tf32.matmul', 'tf32.cudnn')


def _module_version(name):
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001  (not installed, or broken: recorded as such)
        return None
    return str(getattr(module, '__version__', None) or getattr(module, 'VERSION', None) or 'unknown')


def _distribution_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the packages whose behaviour enters a metric (None: not installed)."""
    from vlunet.version import __version__
    return {'python': platform.python_version(),
            'numpy': _module_version('numpy'),
            'scikit-image': _module_version('skimage'),
            'torch': _module_version('torch'),
            'opencv': _module_version('cv2'),
            'pillow': _module_version('PIL'),
            'basicsr': _distribution_version('basicsr') or _module_version('basicsr'),
            'vlunet': __version__}


def _precision_name(precision):
    """None / a torch dtype / a string -> 'fp32', 'bf16 autocast', 'fp16 autocast' (or the string)."""
    if precision in (None, False, 'fp32', 'float32'):
        return 'fp32'
    text = str(precision).replace('torch.', '')
    short = {'bfloat16': 'bf16', 'float16': 'fp16', 'half': 'fp16'}.get(text, text)
    return f'{short} autocast'


def _tiling_name(tile, overlap):
    if not tile:
        return 'none'
    return f'tile {int(tile)}, overlap {int(overlap or 0)}'


def _describe_device(device):
    import torch
    device = torch.device(device if device is not None else 'cpu')
    if device.type == 'cuda' and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return (f'cuda:{index} {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}, cuDNN {cudnn})',
                'cuda')
    if device.type == 'cpu':
        machine = platform.machine() or 'unknown machine'
        return f'cpu ({machine}, {torch.get_num_threads()} threads)', 'cpu'
    return str(device), device.type


def environment(device=None, precision=None, tile=None, tile_overlap=None) -> dict:
    """The environment of a measurement (see the module docstring).

    device: the torch device the network ran on; precision: None/'fp32' or the autocast dtype
    (``torch.bfloat16``, 'bf16', ...); tile, tile_overlap: tiled inference (None: whole images).
    """
    import torch
    described, device_type = _describe_device(device)
    env = {'versions': package_versions(), 'device': described, 'device_type': device_type,
           'precision': _precision_name(precision), 'tiling': _tiling_name(tile, tile_overlap),
           'deterministic': bool(torch.are_deterministic_algorithms_enabled())}
    if device_type == 'cuda':
        env['tf32'] = {'matmul': bool(torch.backends.cuda.matmul.allow_tf32),
                       'cudnn': bool(torch.backends.cudnn.allow_tf32)}
        env['cudnn_benchmark'] = bool(torch.backends.cudnn.benchmark)
    return env


def _get(env, dotted):
    node = env
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def environment_differences(a: Optional[dict], b: Optional[dict], keys=METRIC_KEYS) -> List[str]:
    """``['versions.scikit-image: 0.26.0 vs 0.19.3', ...]`` for the metric-relevant entries in which two
    recorded environments differ (an environment that was not recorded differs from every recorded one)."""
    if not a or not b:
        return [] if (not a and not b) else ['environment: recorded in one, not in the other']
    lines = []
    for key in keys:
        va, vb = _get(a, key), _get(b, key)
        if va != vb:
            lines.append(f'{key}: {"not recorded" if va is None else va} vs {"not recorded" if vb is None else vb}')
    return lines


def describe_environment(env: Optional[dict]) -> str:
    """One line: versions that enter the metrics, device, precision, tiling."""
    if not env:
        return 'not recorded (metrics.json written by an older vlunet-test)'
    v = env.get('versions') or {}
    versions = ', '.join(f'{k} {v[k]}' for k in ('scikit-image', 'numpy', 'torch', 'opencv', 'pillow') if v.get(k))
    extra = ''
    if env.get('tf32'):
        extra = f', TF32 matmul {env["tf32"].get("matmul")}, cuDNN {env["tf32"].get("cudnn")}'
    return f'{versions}; {env.get("device")}; precision {env.get("precision")}; tiling {env.get("tiling")}{extra}'
