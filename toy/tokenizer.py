"""
A tiny, working CLIP tokenizer folder, written from a list of words (for the toy world and the tests; no download).

The files are the ones Stable Diffusion's tokenizer/ folder holds (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so transformers' CLIPTokenizer loads them exactly as it loads SD's, and diffusers'
pipelines can use them too. The vocabulary is laid out like OpenAI CLIP's:

    ids 0..255     the 256 byte-level characters (so any text tokenizes, nothing is ever unknown)
    ids 256..511   the same characters with the end-of-word mark '</w>'
    then           every word as one token 'word</w>', plus the suffixes needed to build it (see below)
    last two       <|startoftext|> (BOS) and <|endoftext|> (EOS); the padding token is EOS, as in SD1.x

How words become single tokens: CLIP's BPE starts from characters, with '</w>' glued to the last one, and applies
merges. Every merge here joins one character to a token that ends in '</w>' ("e" + "d</w>" -> "ed</w>", then
"r" + "ed</w>" -> "red</w>"), so at any moment only the word's last two tokens can merge: the result never depends on
the order of the merges, and a known word always ends up as its one token. An unknown word ends as its longest known
suffix plus single characters.

    python -m toy.tokenizer /tmp/tok a red circle      # writes a folder, then: CLIPTokenizer.from_pretrained(...)
"""
import json
import os
import sys


def byte_chars():
    """CLIP's (and GPT-2's) 256 byte-level characters, in CLIP's vocabulary order: the printable bytes stand for
    themselves, the others (space, control bytes...) for the characters chr(256), chr(257), ... in byte order."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]


def write_clip_tokenizer(folder, words, max_length=77, pad_token="<|endoftext|>"):
    """Write a CLIPTokenizer folder whose vocabulary holds each of `words` as one token; returns the folder.
    Words are lower-cased (CLIP lower-cases its input) and must be single runs of ASCII letters (CLIP's
    pre-tokenizer splits at anything else). pad_token='!' mimics SD2's OpenCLIP tokenizer (pad id 0)."""
    words = sorted({w.lower() for w in words})
    for w in words:
        if not (w.isascii() and w.isalpha()):
            raise ValueError(f"toy tokenizer: {w!r} is not one run of letters, CLIP would split it")
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges, known = [], set(vocab)
    for w in words:
        for i in range(len(w) - 2, -1, -1):  # build the word from its end: "d</w>", "ed</w>", "red</w>"
            left, right = w[i], w[i + 1:] + "</w>"
            if left + right not in known:
                merges.append(f"{left} {right}")
                vocab.append(left + right)
                known.add(left + right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
                   "add_prefix_space": False, "errors": "replace", **special}, f, indent=2)
    return folder


if __name__ == "__main__":
    print(write_clip_tokenizer(sys.argv[1], sys.argv[2:]))
