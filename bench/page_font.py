"""Choose the Hangul font slices the page carries (kr3/static/fonts), so Hangul renders on a machine with no Korean
font (a plain Debian with Chromium): the slices of Nanum Gothic (SIL OFL 1.1, as @fontsource/nanum-gothic ships it,
Google Fonts' split of the font into unicode ranges, files unmodified) that hold the most frequent Hangul of the
corpus, until they cover `--coverage` of its Hangul characters. The CSS declares them under their own family name,
after the system's Korean fonts in style.css, so a browser that has one never downloads them.

    npm pack @fontsource/nanum-gothic@5.3.0 && tar xzf fontsource-nanum-gothic-5.3.0.tgz
    uv run python bench/page_font.py --package package --parquet ../shared/data/nsmc_reviews.parquet
"""

import argparse
import collections
import re
import shutil
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parent.parent / "kr3" / "static" / "fonts"
FAMILY = "kr3 Hangul"


def code_points(unicode_range: str) -> set[int]:
    points = set()
    for part in unicode_range.replace("U+", "").split(","):
        low, _, high = part.strip().partition("-")
        points.update(range(int(low, 16), int(high or low, 16) + 1))
    return points


def slices(package: Path) -> dict[str, tuple[set[int], str]]:
    """The package's 400-weight slices: name → (code points, its unicode-range as written)."""
    css = (package / "400.css").read_text()
    found = re.findall(r"nanum-gothic-\[(\d+)\]-400-normal \*/.*?unicode-range: ([^;]+);", css, re.S)
    return {f"nanum-gothic-{n}-400-normal.woff2": (code_points(r), r) for n, r in found}


def hangul_counts(parquet: Path) -> collections.Counter:
    counts = collections.Counter()
    for review in pd.read_parquet(parquet, columns=["Review"])["Review"].dropna():
        counts.update(ch for ch in review if "\uac00" <= ch <= "\ud7a3" or "\u3131" <= ch <= "\u318e")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="the unpacked @fontsource/nanum-gothic")
    parser.add_argument("--parquet", type=Path, required=True, help="reviews (a Review column)")
    parser.add_argument("--coverage", type=float, default=0.999)
    args = parser.parse_args()
    counts, parts = hangul_counts(args.parquet), slices(args.package)
    held = {name: sum(counts[chr(p)] for p in points if chr(p) in counts) for name, (points, _) in parts.items()}
    total, covered, chosen = sum(counts.values()), 0, []
    for name in sorted(held, key=held.get, reverse=True):
        if covered >= args.coverage * total:
            break
        chosen.append(name)
        covered += held[name]
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    rules = []
    for name in sorted(chosen):
        shutil.copy(args.package / "files" / name, OUT / name)
        rules.append(f"@font-face {{ font-family: '{FAMILY}'; font-style: normal; font-weight: 400; font-display: swap;\n"
                     f"  src: url({name}) format('woff2'); unicode-range: {parts[name][1]}; }}")
    shutil.copy(args.package / "LICENSE", OUT / "OFL.txt")
    header = (f"/* Nanum Gothic (SIL OFL 1.1, OFL.txt), the {len(chosen)} slices of @fontsource/nanum-gothic holding "
              f"{covered / total:.2%} of the corpus's Hangul: made by bench/page_font.py */")
    (OUT / "hangul.css").write_text("\n".join([header, *rules]) + "\n")
    size = sum((OUT / n).stat().st_size for n in chosen)
    print(f"{len(chosen)} of {len(parts)} slices, {size / 1024:.0f} KiB, {covered / total:.4%} of {total:,} Hangul "
          f"characters in {args.parquet.name}")


if __name__ == "__main__":
    main()
