"""bench.py: every section runs on tiny models and prints its timing lines (the numbers themselves are measured on
a GPU, never asserted here)."""
import os
import re

import pytest


@pytest.mark.parametrize("argv,lines", [
    (["--what=elpips", "--batch=2", "--size=8"], [r"E-LatentLPIPS fwd\+bwd \| augment bg \| batch 2 \| 4x8x8"]),
    (["--what=onestep,pairs", "--unet=tiny-sd1", "--vae=tiny", "--batch=2", "--steps=2"],
     [r"UNet forward \| batch 1 \| 16x16", r"UNet forward \| batch 4 \| 16x16", r"VAE decode \| batch 1",
      r"text encoder \(eager\) \| batch 1", r"one-step text-to-image \(text \+ UNet \+ VAE decode\) \| batch 1",
      r"pairs, DDIM 2 \+ CFG 3 \| batch 2 .* pairs/s"]),
    (["--what=pairs", "--unet=tiny-sd1", "--batch=2", "--steps=2", "--channels_last=True"],
     [r"pairs, DDIM 2 \+ CFG 3 \| batch 2 .* \| channels_last \| .* pairs/s"]),
    (["--what=train", "--unet=tiny-sd1", "--batch=4", "--augment=bg"],
     [r"training step \(G \+ D \+ E-LatentLPIPS\), no R1 \| batch 4 \| 16x16 .* \| AdamW foreach \|",
      r"R1 step .* 1/1 of steps",  # train.py's R1 interval (test_train_section_uses_train_py_s_adam_betas)
      r"training step, R1 amortised .* img/s \| \d+\.\d+ TFLOP per step .* MFU",
      r"E-LatentLPIPS fwd\+bwd alone \| batch 4 .* of the step"]),
])
def test_sections_run_on_tiny_models(argv, lines, run):
    r = run(["bench.py", *argv, "--warmup=0", "--iters=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert len(out) == len(lines), r.stdout
    for line, pattern in zip(out, lines):
        assert re.search(pattern, line) and re.search(r"\d+(\.\d+)? ms", line), line


def test_train_section_uses_train_py_s_adam_betas(root):
    """bench.py times train.py's step, so its AdamW betas and R1 interval are train.py's defaults (read from both
    files' knobs)."""
    import ast

    def knobs(name):
        tree = ast.parse(open(os.path.join(root, name)).read())
        return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)
                and t.id in ("beta1", "beta2", "beta1_d", "beta2_d", "betas", "betas_d", "r1_interval")}

    train, bench = knobs("train.py"), knobs("bench.py")
    assert bench["betas"] == (train["beta1"], train["beta2"])
    assert bench["betas_d"] == (train["beta1_d"], train["beta2_d"])
    assert bench["r1_interval"] == train["r1_interval"]
