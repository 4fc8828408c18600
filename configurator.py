"""
The one configuration mechanism of every script (nanoGPT's, made strict). A script declares its knobs as plain
lower-case module-level variables, each with a comment (UPPER_CASE names are constants, not knobs), then calls
`config = configure(globals())`. The command line then overrides them, left to right:

    python train.py config/sd15.py --batch_size=8 --compile=False

A config file is Python that assigns some of the same names; --key=value parses value as a Python literal (or keeps
it as a string; a text knob keeps any text, --prompt=2024 included). Unknown names and wrong types (None included,
unless the default is None) are errors, never silently ignored. `--help` lists every knob.
"""
import ast
import re
import sys


def _knobs(g):
    return {k: v for k, v in g.items() if not k.startswith("_") and not k.isupper()  # UPPER_CASE: constants
            and isinstance(v, (bool, int, float, str, type(None)))}


def _set(g, known, key, value, where):
    if key not in known:
        raise SystemExit(f"{where}: unknown config key '{key}' (python {sys.argv[0]} --help lists them)")
    old = known[key]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --lr=1 means 1.0
    if old is not None and type(value) is not type(old):  # None too: only a knob whose default is None takes it
        raise SystemExit(f"{where}: {key} must be {type(old).__name__}, got {value!r}")
    g[key] = value


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the knobs in the module globals g; return the knobs as a dict."""
    argv = sys.argv[1:] if argv is None else argv
    known = _knobs(g)
    for arg in argv:
        if arg in ("-h", "--help"):
            source = open(g.get("__file__", sys.argv[0])).read()
            print(f"knobs of {sys.argv[0]} (override with --key=value or a config file):")
            for key, value in known.items():
                m = re.search(rf"^{key} = .*?#\s*(.*)$", source, re.M)
                print(f"  --{key}={value!r}" + (f"  # {m.group(1)}" if m else ""))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare string such as --teacher=toy
            if isinstance(known.get(key), str) and value is not None and not isinstance(value, str):
                value = text  # a text knob keeps text that reads as a number: --prompt=2024, --out_dir=1e3
            _set(g, known, key, value, arg)
        else:  # a config file: run it in its own namespace, then copy its knobs over ours
            ns = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), ns)
            except FileNotFoundError:
                raise SystemExit(f"{arg}: no such config file") from None
            for key, value in _knobs(ns).items():
                _set(g, known, key, value, arg)
    return {k: g[k] for k in known}
