"""The sandbox's child: run as `python -I [-S] child.py FD`, with its job as JSON on stdin.

It locks itself down (mounts, limits, uid, audit hook), runs the solution and each test, and
writes one nonce-tagged JSON line per result to the pipe FD. Standard library only, and no
import of mlx_rft: it runs in a bare, isolated interpreter (possibly not this one).
"""

import os
import sys


def _boot():
    import json, re, resource, signal, builtins
    rfd = int(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    dumps, write = json.dumps, os.write

    def send(obj):
        obj["n"] = nonce
        write(rfd, (dumps(obj) + "\n").encode())

    notes = []
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception as e:
        libc = None
        notes.append("no ctypes: %s" % e)
    uid, gid = job["uid"], job["gid"]
    if job["lockdown"]:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
        OPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21}
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

        def mount(src, dst, fstype, flags, data=None):
            enc = lambda s: None if s is None else os.fsencode(s)
            if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
                raise OSError(ctypes.get_errno(), "mount %s: %s" % (dst, os.strerror(ctypes.get_errno())))

        unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
        # Every mount read-only (this mount namespace is private, the host is untouched)...
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        for parts in mounts:
            point = unescape(parts[4])
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for opt in parts[5].split(","):
                flags |= OPT.get(opt, 0)
            try:
                mount(None, point, None, flags)
            except OSError as e:
                if point == "/":
                    raise  # never run with a writable root: fail as a sandbox error instead
                notes.append(str(e))
        # ...then a private, size-capped /tmp that holds the working folder.
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=755" % job["tmpfs_kb"])
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
        # The interpreter's folders may sit under an unreadable home (e.g. /root/.pyenv): expose
        # them read-only under /tmp so the unprivileged uid can still import the stdlib.
        if uid is not None:
            os.mkdir("/tmp/.python", 0o755)
            remap = {}
            for i, path in enumerate(list(sys.path)):
                if os.path.isdir(path):
                    target = "/tmp/.python/%d" % i
                    os.mkdir(target, 0o755)
                    mount(path, target, None, MS_BIND)
                    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                    sys.path[i] = target
                    remap[path] = target
            # Packages imported already (collections, encodings) find submodules via __path__.
            for mod in list(sys.modules.values()):
                paths = getattr(mod, "__path__", None)
                if isinstance(paths, list):
                    for j, p in enumerate(paths):
                        for old, new in remap.items():
                            if p == old or p.startswith(old + "/"):
                                paths[j] = new + p[len(old):]
            sys.path_importer_cache.clear()
    else:
        workdir = job["workdir"]
    if uid is not None:
        os.chown(workdir, uid, gid)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    if uid is not None and not job["lockdown"]:
        import importlib
        for name in job["preload"]:
            try:
                importlib.import_module(name)
            except Exception:
                pass
    R = resource
    lim = job["limits"]
    for name, soft, hard in (("CORE", 0, 0), ("CPU", lim["cpu"], lim["cpu"] + 1),
                             ("FSIZE", lim["fsize"], lim["fsize"]), ("NOFILE", lim["nofile"], lim["nofile"]),
                             ("NPROC", lim["nproc"], lim["nproc"]), ("AS", lim["as"], lim["as"])):
        try:
            R.setrlimit(getattr(R, "RLIMIT_" + name), (soft, hard))
        except (ValueError, OSError, AttributeError) as e:  # e.g. RLIMIT_AS on macOS
            notes.append("RLIMIT_%s not set: %s" % (name, e))
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    try:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (Linux): no privilege gain through exec
    except AttributeError:
        pass
    if job["guard"]:
        blocked = frozenset(job["blocked"])
        wd = os.path.realpath(workdir)
        realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        PATH_EVENTS = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod",
                                 "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime",
                                 "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile",
                                 "shutil.copytree", "shutil.move", "shutil.chown"))

        def inside(p):
            if isinstance(p, int) or p is None:
                return True
            try:
                rp = realpath(fsdecode(fspath(p)))
            except Exception:
                return False
            return rp == wd or rp.startswith(wd + "/") or rp == "/dev/null"

        def guard(event, args):
            if event in blocked:
                raise PermissionError("sandbox: %s is not allowed" % event)
            if event == "open":
                path, mode, flags = args
                if ((mode and any(c in mode for c in "wax+")) or (flags and flags & WRITE)) and not inside(path):
                    raise PermissionError("sandbox: writing outside the working folder is not allowed")
            elif event in PATH_EVENTS:
                for p in args[:2]:
                    if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                        raise PermissionError("sandbox: %s outside the working folder is not allowed" % event)

        sys.addaudithook(guard)
    send({"ready": True, "notes": notes})

    g = {"__name__": "__solution__", "__builtins__": builtins}
    limit = job["test_timeout"]

    def on_alarm(signum, frame):
        raise TimeoutError("test timed out after %gs" % limit)

    if limit:
        signal.signal(signal.SIGALRM, on_alarm)

    def describe(e):
        try:
            return ("%s: %s" % (type(e).__name__, e))[:300]
        except BaseException:
            return type(e).__name__

    def phase(src, filename):
        try:
            if limit:
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                exec(compile(src, filename, "exec"), g)
            finally:
                if limit:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            return None
        except BaseException as e:
            return describe(e)

    failed = phase(job["code"], "<solution>")
    if failed:
        failed = "solution: " + failed
    elif job["setup"]:
        failed = phase(job["setup"], "<tests>")
        failed = failed and "test setup: " + failed
    for i, test in enumerate(job["tests"]):
        err = failed or phase(test, "<test %d>" % i)
        send({"i": i, "ok": err is None, "e": err})
    send({"done": True})
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)


if __name__ == "__main__":
    _boot()
