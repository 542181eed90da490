"""Make `import torchvision` work with the CPU torch (run by scripts/setup.sh; idempotent).

PyPI's torchvision wheel is a CUDA build whose C ops do not load against the CPU torch; its
`_meta_registrations.py` then fails registering fake kernels for `torchvision::nms`/`qnms`.
The transforms transformers needs are pure torch, so we guard those two registrations.
"""

import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    raise SystemExit("torchvision is not installed in this environment")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")'
    guarded = (f'@(torch.library.register_fake("torchvision::{op}") '
               f'if hasattr(torch.ops.torchvision, "{op}") else (lambda fn: fn))')
    text = text.replace(plain, guarded)
path.write_text(text)
print(f"torchvision import fix applied: {path}")
