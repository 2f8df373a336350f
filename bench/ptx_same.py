"""Are two folders of PTX (`PTX_DIR=dir python bench/compile_probe.py`, before and after a change) the same
instructions? Compares each file's instructions with the debug sections, .loc / .file lines, comments and the labels
only the debug info uses dropped, and the branch labels renumbered in order (a refactor moves source lines and
inlining scopes, which renames them). Usage: python bench/ptx_same.py before_dir after_dir"""
import os
import re
import sys


def instructions(path):
    text = re.split(r"\.section\s+\.debug", open(path).read())[0]
    lines = [re.sub(r"\s*//.*$", "", s.strip()) for s in text.splitlines()]
    lines = [s for s in lines if s and not s.startswith((".loc", ".file"))]
    label = re.compile(r"\$L__\w+")
    used = {ref for s in lines if not re.fullmatch(r"\$L__\w+:", s) for ref in label.findall(s)}
    names: dict = {}
    return [label.sub(lambda m: names.setdefault(m.group(0), f"L{len(names)}"), s) for s in lines
            if not (re.fullmatch(r"\$L__\w+:", s) and s[:-1] not in used)]


def main(before, after):
    differ = 0
    for name in sorted(os.listdir(before)):
        other = os.path.join(after, name)
        same = os.path.exists(other) and instructions(os.path.join(before, name)) == instructions(other)
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}  {name}")
    print(f"{differ} of {len(os.listdir(before))} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
