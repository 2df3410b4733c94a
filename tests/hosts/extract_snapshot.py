"""Write out every blob of one commit of a bare git snapshot into a folder (no work tree, no network).

    python3 tests/hosts/extract_snapshot.py GITDIR REF DEST

REF is any commit-ish (HEAD, a tag, a hash). Nothing is done when DEST/.snapshot-commit already names
that commit. Blobs absent from the snapshot (large files the fetch left out) are reported and skipped; submodules
become empty folders; DEST/.snapshot-commit records the commit. Used by setup_a1111.sh and setup_forge.sh.
"""
import os
import subprocess
import sys
gitdir, ref, dest = sys.argv[1:]
git = ["git", "--git-dir", gitdir]
commit = subprocess.run(git + ["rev-parse", "--verify", f"{ref}^{{commit}}"], check=True, capture_output=True,
                        text=True).stdout.strip()
stamp = os.path.join(dest, ".snapshot-commit")
if os.path.isfile(stamp) and open(stamp).read().strip() == commit:
    print(f"  {dest} already at {commit}")
    sys.exit(0)
os.makedirs(dest, exist_ok=True)
out = subprocess.run(git + ["ls-tree", "-r", "-z", "--full-tree", commit],
                     check=True, capture_output=True).stdout
entries = []
for rec in out.split(b"\0"):
    if not rec:
        continue
    meta, path = rec.split(b"\t", 1)
    mode, typ, sha = meta.split()
    entries.append((mode.decode(), typ.decode(), sha.decode(), os.fsdecode(path)))
cat = subprocess.Popen(git + ["cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
missing, written = [], 0
for mode, typ, sha, path in entries:
    target = os.path.join(dest, path)
    if typ == "commit":  # submodule: leave an empty folder
        os.makedirs(target, exist_ok=True)
        continue
    cat.stdin.write(sha.encode() + b"\n")
    cat.stdin.flush()
    header = cat.stdout.readline().split()
    if header[1] == b"missing":
        missing.append(path)
        continue
    data = cat.stdout.read(int(header[2]))
    cat.stdout.read(1)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    if os.path.islink(target) or (mode == "120000" and os.path.exists(target)):
        os.remove(target)
    if mode == "120000":
        os.symlink(os.fsdecode(data), target)
    else:
        with open(target, "wb") as f:
            f.write(data)
        os.chmod(target, 0o755 if mode == "100755" else 0o644)
    written += 1
cat.stdin.close()
cat.wait()
print(f"  {dest}: {written} files from {commit[:10]}" + (f", {len(missing)} absent from the snapshot: {missing[:5]}" if missing else ""))
with open(stamp, "w") as f:
    f.write(commit + "\n")
