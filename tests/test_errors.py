"""Errors a user meets with damaged or unexpected inputs: each is one line that names the file (or knob), says what is
wrong and how to fix it, and comes before any work that it would waste."""
import os
import pickle
import shutil

import pytest

def one_line(msg):
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_truncated_text_encoder_names_the_file(tmp_path):
    from teacher import load_teacher
    from toy import TEACHER
    shutil.copytree(TEACHER, tmp_path / "sd")
    path = tmp_path / "sd" / "text_encoder" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # an interrupted download or copy
    with pytest.raises(ValueError) as e:
        load_teacher(str(tmp_path / "sd"))
    msg = one_line(str(e.value))
    assert msg.startswith(f"{path}: not a readable safetensors file (SafetensorError: ")
    assert msg.endswith("the file is cut short or damaged: copy or download it again")


def test_prompt_file_not_utf8_names_the_line(tmp_path):
    from make_pairs import read_prompts
    path = tmp_path / "captions.txt"
    path.write_bytes("a red circle\na caf\u00e9 on the left\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        read_prompts(str(path))
    msg = one_line(str(e.value))
    assert msg.startswith(f"{path}:2: not UTF-8 text (byte 0xe9); save the prompt file as UTF-8")
    assert "iconv -f latin1 -t utf-8" in msg
    path.write_bytes("a red circle\na caf\u00e9 on the left\n".encode())  # the same prompts in UTF-8 are read
    assert read_prompts(str(path)) == ["a red circle", "a caf\u00e9 on the left"]


def coco_args(tmp_path, out):
    from test_eval import fake_coco
    fake_coco(tmp_path / "coco", n_images=2)
    # a teacher that does not exist: the output check must come before any model is loaded
    return ["eval.py", "--coco=coco2014", f"--coco_dir={tmp_path}/coco", "--coco_n=1", "--metrics=",
            f"--teacher={tmp_path}/no-teacher", f"--out={out}"]


def test_coco_out_that_cannot_be_written_stops_first(tmp_path, run):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"  # its parent is a file: the folder cannot be made
    r = run(coco_args(tmp_path, out))
    assert r.returncode != 0
    msg = one_line(r.stderr.strip())
    assert msg.startswith(f"--out={out}: cannot create or write this folder (a file is where a folder must be: ")
    assert msg.endswith("choose a --out in a writable place") and "no-teacher" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_coco_out_in_a_read_only_folder_stops_first(tmp_path, run):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    r = run(coco_args(tmp_path, tmp_path / "ro" / "run"))
    os.chmod(tmp_path / "ro", 0o700)
    assert r.returncode != 0 and "cannot create or write this folder" in r.stderr and "Permission denied" in r.stderr
    assert "no-teacher" not in r.stderr


def test_toy_table_out_that_cannot_be_written_stops_first(tmp_path, run):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "table"  # written as table.md and table.json, after the whole table is computed
    r = run(["eval.py", "--ckpt=" + str(tmp_path / "no-ckpt.pt"), f"--out={out}"])
    assert r.returncode != 0
    msg = one_line(r.stderr.strip())
    assert msg.startswith(f"--out={out}: cannot create or write its folder {tmp_path / 'a-file'} (a file is where a "
                          "folder must be")


class RunsACommand:
    """A pickle that runs a shell command when it is loaded, as a malicious .ckpt would."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"echo hacked > {self.flag}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocols it does not write
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])  # torch.save's, and plain pickle.dump's
def test_pickled_system_call_is_refused_unrun(tmp_path, protocol):
    from weights import read_checkpoint
    flag, path = tmp_path / "HACKED", tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": RunsACommand(flag)}, f, protocol=protocol)
    with pytest.raises(ValueError) as e:
        read_checkpoint(str(path))
    assert not flag.exists()
    msg = one_line(str(e.value))
    print(msg)
    assert msg.startswith(f"{path}: ") and "weights_only=False" not in msg
    # torch's reason as a whole sentence, then ours: no half-word cut from the middle of torch's paragraphs
    reason = msg[msg.index("(") + 1:msg.index(")")]
    assert reason.split(": ", 1)[-1][0].isupper() and reason[-1].isalnum(), reason
    assert msg.endswith("use a .safetensors copy of the model")
    if protocol == 2:  # torch reaches the GLOBAL and names the blocked call
        assert f"GLOBAL {os.system.__module__}.system whose module {os.system.__module__} is blocked" in reason
        assert "nothing in the file was run. It calls into a module that torch blocks outright" in msg
