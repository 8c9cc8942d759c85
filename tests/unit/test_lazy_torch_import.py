"""torch is imported lazily, so its first import can happen in several threads at once.

The service checks every configured model in a thread pool (weights, unsafe pickles); each
check may be the first code in the process to need torch. Run in a fresh interpreter, where
torch is not imported yet.
"""
import subprocess
import sys

SCRIPT = r"""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vfm.models.backends.torch import import_torch
from vfm.models.checkpoints import check_checkpoint, load_state_dict

path = Path(sys.argv[1])
assert "torch" not in sys.modules
with ThreadPoolExecutor(8) as pool:
    # torch.serialization (the pickle check) and torch.hub (the weights cache) at once is what
    # broke plain imports: "cannot import name 'tqdm' from partially initialized module 'torch.hub'"
    hubs = [pool.submit(import_torch, "torch.hub") for _ in range(3)]
    checks = [pool.submit(check_checkpoint, path) for _ in range(3)]
    loads = [pool.submit(load_state_dict, path) for _ in range(2)]
    for future in hubs + checks + loads:
        future.result()
print(sorted(loads[0].result()))
"""


def test_checkpoints_checked_from_many_threads_in_a_fresh_process(tmp_path):
    import torch

    path = tmp_path / "state.pth"
    torch.save({"weight": torch.ones(2)}, path)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['weight']"
