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


def test_text_knobs_keep_text_that_reads_as_a_number():
    out = configure(knobs(), ["--teacher=2024", "--resume_from=1e3"])
    assert out["teacher"] == "2024" and out["resume_from"] == 1000.0  # a None default takes any literal
    assert configure(knobs(), ["--teacher='sd15'"])["teacher"] == "sd15"  # a quoted literal is unquoted


@pytest.mark.parametrize("argv,msg", [(["--batchsize=4"], "unknown config key 'batchsize'"),
                                      (["--batch_size=four"], "batch_size must be int"),
                                      (["--compile=1"], "compile must be bool"),
                                      (["--batch_size=None"], "batch_size must be int, got None"),
                                      (["--teacher=None"], "teacher must be str, got None"),
                                      (["--lr"], "expected --key=value"),
                                      (["missing.py"], "missing.py: no such config file")])
def test_errors(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        configure(knobs(), argv)


@pytest.mark.parametrize("argv,msg", [(["bench.py", "--what=onestep,lpips"],
                                       "unknown section(s) ['lpips']; the sections are: elpips,"),
                                      (["-m", "toy.build", "--stage=vae,teachr"], "unknown teachr (stages: all,")])
def test_scripts_refuse_unknown_choices(argv, msg, run):
    r = run(argv)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
