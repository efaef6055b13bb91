"""
Data: the GPT-2 tokenizer from the repo's own rank file, and token streams cached as uint16 memmaps.

The built-in corpus is the Python standard library's own source, every .py file under the running
interpreter's stdlib directory except site-packages and test folders: real text that every machine has,
so training needs no download. Files are joined with <|endoftext|> in path order and split into train
and val by a hash of each file's path (about 2% val), so the split never changes and no file is in both.

--data also takes a text file (its last 2% of tokens is val), a directory of text files (split by path
like the built-in corpus), or a directory that already holds train.bin and val.bin.
"""

import hashlib
import json
import os
import sys
import sysconfig

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = os.path.join(HERE, "data", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256
VAL_EVERY = 50  # a file goes to val when its path hash is 0 mod 50: about 2%


def tokenizer():
    """tiktoken's r50k_base (GPT-2 BPE), built from data/r50k_base.tiktoken; tiktoken checks its hash."""
    return tiktoken.Encoding("r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=load_tiktoken_bpe(RANKS, RANKS_SHA256),
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return root, files


def text_files(root):
    """Every file under root that reads as UTF-8 text, in path order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    if "\0" not in fh.read(4096):
                        files.append(path)
            except (UnicodeDecodeError, OSError):
                pass
    return files


def is_val(relpath):
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % VAL_EVERY == 0


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def write_bin(path, tokens):
    arr = np.asarray(tokens, dtype=np.uint16)
    with open(path + ".tmp", "wb") as f:
        arr.tofile(f)
    os.replace(path + ".tmp", path)


def save(out_dir, source, tokens, files):
    """Write {split: token list} as out_dir/{split}.bin and a meta.json, each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for split, toks in tokens.items():
        write_bin(os.path.join(out_dir, f"{split}.bin"), toks)
    meta = dict(source=source, tokenizer="r50k_base", files=files, python=sys.version.split()[0],
                **{f"{split}_tokens": len(toks) for split, toks in tokens.items()})
    path = os.path.join(out_dir, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


def tokenise_files(root, relpaths, enc, desc):
    """Each file's tokens then <|endoftext|>, into train or val by the hash of its path."""
    tokens = {"train": [], "val": []}
    for rel in tqdm(relpaths, desc=desc, unit="file"):
        tokens["val" if is_val(rel) else "train"] += enc.encode_ordinary(read_text(os.path.join(root, rel))) + [EOT]
    return tokens


def prepare(data=None, cache_root=os.path.join(HERE, "data")):
    """The directory holding train.bin and val.bin for --data (None: the built-in corpus), built and
    cached on first use."""
    if data is None:
        root, files = stdlib_files()
        version = "%d.%d" % sys.version_info[:2]
        out_dir = os.path.join(cache_root, f"stdlib-py{version}")
        source = f"python {version} stdlib ({root})"
    else:
        if not os.path.exists(data):
            raise ValueError(f"--data {data!r} does not exist")
        if os.path.isdir(data) and all(os.path.exists(os.path.join(data, f"{s}.bin")) for s in ("train", "val")):
            return data
        key = hashlib.sha1(os.path.abspath(data).encode()).hexdigest()[:10]
        out_dir = os.path.join(cache_root, f"{os.path.basename(os.path.normpath(data))}-{key}")
        source = os.path.abspath(data)
        if os.path.isfile(data) and os.path.getsize(data) == 0:
            raise ValueError(f"--data {data!r} is an empty file")
        root, files = (data, text_files(data)) if os.path.isdir(data) else (None, [data])
        if not files:
            raise ValueError(f"--data {data!r} holds no text files")
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("source") == source:
                return out_dir
    enc = tokenizer()
    if root is None:  # one text file: its last 2% of tokens is val
        toks = enc.encode_ordinary(read_text(data)) + [EOT]
        cut = len(toks) - len(toks) // VAL_EVERY
        tokens = {"train": toks[:cut], "val": toks[cut:]}
    else:
        tokens = tokenise_files(root, [os.path.relpath(f, root) for f in files], enc, f"tokenising {source}")
    save(out_dir, source, tokens, len(files))
    return out_dir


def load(data_dir, seq_len):
    """The train and val token streams as read-only uint16 memmaps, checked to hold a sequence each."""
    streams = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        n = os.path.getsize(path) // 2
        if n == 0:
            raise ValueError(f"the {split} split of {data_dir} is empty"
                             + (": give --data more files (about 2% of them go to val)" if split == "val" else ""))
        if n < seq_len:
            raise ValueError(f"the {split} split of {data_dir} has {n} tokens, fewer than one sequence "
                             f"(--seq_len={seq_len})")
        streams[split] = np.memmap(path, dtype=np.uint16, mode="r")
    return streams["train"], streams["val"]
