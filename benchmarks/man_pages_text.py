"""Write a second evaluation text: Linux man pages (section 1) rendered to plain text.

Nothing in dha trains or calibrates on it, so the benchmarks score every model on it as text that
no conversion saw (the built-in `pydoc` text is the one they train and calibrate on). Pages are
sorted by name and taken from the start; each page is one document (blank lines inside a page
are kept as paragraph breaks, which is how dha's .txt reader splits documents).

    python benchmarks/man_pages_text.py --pages 60 --out ~/.cache/dha/man1.txt
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def render(path: str) -> str:
    out = subprocess.run(
        ["man", "-l", path],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "PAGER": "cat"},
    )
    return re.sub(r".\x08", "", out.stdout) if out.returncode == 0 else ""  # drop overstrike (bold, underline)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="/usr/share/man/man1")
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    names = sorted(n for n in os.listdir(args.section) if n.endswith(".gz"))[: args.pages]
    texts = [t for t in (render(os.path.join(args.section, n)) for n in names) if t.strip()]
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n\n".join(texts))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(texts)} pages, {sum(map(len, texts)):,} characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
