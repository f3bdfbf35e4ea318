#!/usr/bin/env bash
# The convergence study's corpus and tokenizer, made from packages on the registries (run it from
# the project root on a machine with network access; nothing here is committed):
# - text: the documentation of Python 3.11 (its reST sources) and of Perl 5.36 (its POD files),
#   as Debian ships them (python3.11-doc, perl-doc), one document per file;
# - tokenizer: GPT-2's byte-level BPE, from the gpt2.tiktoken ranks that openai-whisper ships,
#   converted to a tokenizers JSON by transformers' TikTokenConverter, with <|endoftext|> (50256);
# - the corpus: `python -m lightning_attn_parallel.data.prepare`, 2% of the documents held out.
# Writes data/convergence/{tokenizer.json, corpus/}.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=data/convergence
work=$(mktemp -d)
mkdir -p "$out"
echo "[1/4] Debian documentation packages"
(cd "$work" && apt-get download python3.11-doc perl-doc >/dev/null 2>&1)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
mkdir -p "$work/docs"
i=0
while IFS= read -r -d '' file; do
  i=$((i + 1)); cp "$file" "$work/docs/$(printf %05d $i).txt"
done < <(find "$work/root" \( -name "*.rst.txt" -o -name "*.pod" \) -size +1k -print0 | sort -z)
echo "      $i documents, $(cat "$work"/docs/*.txt | wc -c) bytes"
echo "[2/4] GPT-2's BPE ranks from openai-whisper"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q tiktoken transformers tokenizers
"$work/venv/bin/pip" download -q --no-deps --no-binary :all: openai-whisper==20250625 -d "$work" 2>/dev/null ||
  "$work/venv/bin/pip" download -q --no-deps openai-whisper==20250625 -d "$work"
tar xzf "$work"/openai_whisper-*.tar.gz -C "$work"
echo "[3/4] tokenizer.json"
"$work/venv/bin/python" - "$work" "$out/tokenizer.json" <<'PY'
import glob, sys
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

ranks = glob.glob(f"{sys.argv[1]}/openai_whisper-*/whisper/assets/gpt2.tiktoken")[0]
pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TikTokenConverter(vocab_file=ranks, pattern=pattern).converted().save(sys.argv[2])
tokenizer = Tokenizer.from_file(sys.argv[2])
tokenizer.add_special_tokens(["<|endoftext|>"])
tokenizer.save(sys.argv[2])
assert tokenizer.encode("Hello world").ids == [15496, 995], "not GPT-2's ranks"
print(f"      vocabulary {tokenizer.get_vocab_size()}, <|endoftext|> = {tokenizer.token_to_id('<|endoftext|>')}")
PY
echo "[4/4] prepare"
rm -rf "$out/corpus"
.venv/bin/python -m lightning_attn_parallel.data.prepare --tokenizer "$out/tokenizer.json" \
  --input "$work"/docs/*.txt --txt-documents files --val-fraction 0.02 --eos "<|endoftext|>" \
  --output "$out/corpus"
rm -rf "$work"
du -sh "$out"/*
