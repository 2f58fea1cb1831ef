"""Two CPU processes (gloo): trainable tensors identical across ranks (CLIP adapters trained
alongside, learnable temperature, different initial seeds), accumulation under DDP = one large batch."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_two_ranks_keep_identical_tensors_and_accumulate_like_one_batch(tmp_path):
    out = tmp_path / 'ddp.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29547',
           os.path.join(REPO, 'tests', 'models', 'ddp_worker.py'), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result['trainable_tensors'] > 100
    assert result['rank_difference'] == 0.0
    assert result['ddp_vs_single_batch4'] < 1e-10
    assert result['ddp_accumulated_vs_single_batch4'] < 1e-10
