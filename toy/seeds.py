"""
One toy recipe over several seeds, and its metrics as mean ± sd; with two recipes, their difference seed by seed.

    python -m toy.seeds --out_dir=out/seeds/gan --seeds=0,1,2 --jobs=2 --max_steps=2000
    python -m toy.seeds --out_dir=out/seeds/elpips --seeds=0,1,2 --jobs=2 --max_steps=2000 --gan=False
    python -m toy.seeds --compare=out/seeds/gan,out/seeds/elpips   # both tables, then gan - elpips per seed

Seed s trains `python train.py --seed=s --out_dir=OUT_DIR/seed{s}` with every other --key=value given here (the seed
draws the data order, the augmentations and D's new heads; the pairs and the teacher are the same for all). Runs go
`jobs` at a time, each on `threads` CPU threads; re-running the command resumes unfinished runs (train.py resumes
from its checkpoint) and skips finished ones (out_dir/seedS/metrics.json at the run's last step). The paired
difference of two recipes uses the seeds they share: its mean, standard error (sd / sqrt(n)) and mean / SE. For a
recipe with a GAN, each run's largest |mean logit| of D on any line of its log is printed too (D's health).
"""
import json
import math
import os
import subprocess
import sys
import time

OWN = ("out_dir", "seeds", "jobs", "threads", "compare")  # this script's knobs; every other goes to train.py
METRICS = ("fid", "acc", "sharpness", "to_teacher")


def parse(argv):
    own, passed = {"seeds": "0,1,2", "jobs": "1", "threads": "1", "out_dir": "", "compare": ""}, []
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"{arg}: expected --key=value (this script's knobs: {', '.join(OWN)}; others go to train.py)")
        if key in OWN:
            own[key] = value
        elif key in ("seed", "out_dir"):
            raise SystemExit(f"{arg}: the seed and folder of each run are set here (--seeds, --out_dir)")
        else:
            passed.append(arg)
    return own, passed


def results(folder):
    """{seed: {(metric, objects): value}} of the finished runs in folder (their metrics.json)."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name, "metrics.json")
        if name.startswith("seed") and os.path.exists(path):
            with open(path) as f:
                table = json.load(f)
            row = next(v for k, v in table.items() if k.startswith("student"))
            out[int(name[4:])] = {(m, int(k)): v[m] for k, v in row.items() for m in METRICS if m in v}
    return out


def d_logit_extreme(folder):
    """The largest |mean logit| of D (d_real, d_fake, d_mm, d_heldout) on any line of a run's log.txt; None without a
    GAN. The log holds every log interval's mean, so this is the whole run's extreme at the log's resolution."""
    path, worst = os.path.join(folder, "log.txt"), None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                for field in line.split("|"):
                    key, _, value = field.strip().partition(" ")
                    if key in ("d_real", "d_fake", "d_mm", "d_heldout"):
                        worst = max(worst or 0.0, abs(float(value)))
    return worst


def finished(out, steps):
    """Whether the run in out has its metrics at the last step."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)["step"] >= steps


def mean_sd(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def table(folder):
    runs = results(folder)
    if not runs:
        raise SystemExit(f"{folder}: no finished runs (seedS/metrics.json) here")
    print(f"{folder}: seeds {sorted(runs)}")
    for key in sorted(next(iter(runs.values()))):
        m, sd = mean_sd([r[key] for r in runs.values()])
        print(f"  {key[0]:>10s}, {key[1]} obj. {m:9.4f} ± {sd:.4f}   " + " ".join(f"{r[key]:.4f}" for r in runs.values()))
    extremes = [d_logit_extreme(os.path.join(folder, f"seed{s}")) for s in runs]
    if any(e is not None for e in extremes):  # D's health over the whole run: its mean logits' largest size
        print("  max |D's mean logit| over the log  " + " ".join("-" if e is None else f"{e:.4f}" for e in extremes))
    return runs


def compare(a, b):
    ra, rb = table(a), table(b)
    seeds = sorted(set(ra) & set(rb))
    print(f"{a} - {b}, paired over seeds {seeds}:")
    for key in sorted(ra[seeds[0]]):
        d = [ra[s][key] - rb[s][key] for s in seeds]
        m, sd = mean_sd(d)
        se = sd / math.sqrt(len(d))
        print(f"  {key[0]:>10s}, {key[1]} obj. {m:+9.4f} ± {se:.4f} (SE)   mean/SE {m / se if se else math.nan:+.2f}   "
              + " ".join(f"{v:+.4f}" for v in d))


def main(argv):
    own, passed = parse(argv)
    if own["compare"]:
        folders = own["compare"].split(",")
        if len(folders) != 2:
            raise SystemExit(f"--compare={own['compare']}: give two recipe folders, comma-separated")
        return compare(*folders)
    if not own["out_dir"]:
        raise SystemExit("--out_dir: the recipe's folder (each seed runs in out_dir/seedS)")
    from make_pairs import pairs_complete
    seeds = [int(s) for s in own["seeds"].split(",")]
    knob = lambda name, default: next((a.split("=", 1)[1] for a in passed if a.startswith(f"--{name}=")), default)
    steps, root = int(knob("max_steps", 400)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pairs = os.path.join(root, knob("pairs", "pairs/toy"))
    todo, running = [s for s in seeds if not finished(os.path.join(own["out_dir"], f"seed{s}"), steps)], []
    env = dict(os.environ, OMP_NUM_THREADS=own["threads"], MKL_NUM_THREADS=own["threads"])
    while todo or running:
        # the first run makes the toy pairs when they are missing: the others start once they are complete
        while todo and len(running) < (int(own["jobs"]) if pairs_complete(pairs) else 1):
            s = todo.pop(0)
            out = os.path.join(own["out_dir"], f"seed{s}")
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.txt"), "a")
            cmd = [sys.executable, "train.py", f"--seed={s}", f"--out_dir={os.path.abspath(out)}", *passed]
            print(f"seed {s}: {' '.join(cmd[1:])} (output in {out}/stdout.txt)", flush=True)
            running.append((s, subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for s, p in [(s, p) for s, p in running if p.poll() is not None]:
            running.remove((s, p))
            if p.returncode:
                raise SystemExit(f"seed {s}: train.py failed (exit {p.returncode}); see "
                                 f"{own['out_dir']}/seed{s}/stdout.txt, then re-run this command to resume")
    table(own["out_dir"])


if __name__ == "__main__":
    main(sys.argv[1:])
