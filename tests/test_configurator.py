"""configurator.py: files and --key=value override knobs left to right; unknown keys and wrong types fail."""
import pytest

from configurator import configure


def knobs():
    return {"batch_size": 8, "lr": 1e-4, "compile": True, "teacher": "toy", "resume_from": None}


def test_overrides_left_to_right(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 32\nteacher = 'sd15'\nimport math  # modules are not knobs\n")
    g = knobs()
    out = configure(g, [str(cfg_file), "--batch_size=4", "--lr=1", "--compile=False", "--resume_from=out/x"])
    assert out == {"batch_size": 4, "lr": 1.0, "compile": False, "teacher": "sd15", "resume_from": "out/x"}
    assert g["batch_size"] == 4 and isinstance(g["lr"], float)


@pytest.mark.parametrize("argv,msg", [(["--batchsize=4"], "unknown config key 'batchsize'"),
                                      (["--batch_size=four"], "batch_size must be int"),
                                      (["--compile=1"], "compile must be bool"),
                                      (["--lr"], "expected --key=value"),
                                      (["missing.py"], "missing.py: no such config file")])
def test_errors(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        configure(knobs(), argv)
