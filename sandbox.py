"""HumanEval's sandbox: eval.py runs each model-written program here (prompt + completion + tests + the check
call) and learns whether it ran to its end; nothing else in the project runs model-written code.

`run_program` starts `python -I -B sandbox.py --sandbox` (the supervisor), which
enters new network, mount, IPC and PID namespaces and forks the program's process, PID 1 of its
own namespace. That process contains itself before it runs the candidate code, recording each
layer that took effect:
  no-network     a network namespace with no interface up, not even loopback
  read-only-fs   every mount read-only except the scratch directory; a fresh /proc of its own
  disk-quota     the scratch directory is a tmpfs of SANDBOX_DISK_MB (and 1,000 files); one
                 file is at most 16 MB (RLIMIT_FSIZE)
  pid-namespace  it sees and can signal only its own processes, and all of them die with it
  own-uid        a uid no other sample has (as root; otherwise a user namespace of its own), so
                 RLIMIT_NPROC counts only its own threads and processes (64: threads work,
                 fork bombs stop) and no other sample's files or processes are its own
  no-capabilities, rlimits (address space, CPU seconds, file size, processes, no core file)
  audit-guard    a Python audit hook refusing sockets, subprocesses, ctypes and writes outside the
                 scratch dir: a best-effort guard (the program can reach it), not a jail
Without the layers in REQUIRED_ISOLATION the program is not run unless allow_unisolated is set.
A program passes only if the nonce comes back: the parent writes a random nonce into a pipe
that the wrapper reads only after the program's last statement (check(...)) has returned, and
echoes into another pipe, so sys.exit(0), os._exit(0), a signal or a printed "passed" all fail.
The nonce is in no argument, file, environment variable or Python object while the program runs;
only a program that reads the harness's own file descriptors on purpose could replay it.
"""
import os
import select
import subprocess
import sys

SANDBOX_DISK_MB = 64
REQUIRED_ISOLATION = ("no-network", "read-only-fs", "disk-quota", "pid-namespace", "own-uid", "no-capabilities")
_sample_uids = iter(range(10**9))  # uid = 200,000 + 1,000 * (pid % 1,000) + a per-process counter


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, python_guard: bool = True,
                allow_unisolated: bool = False) -> dict:
    """{"status": passed | failed | timed out | refused, "passed", "output", "layers"} for one program.
    `python_guard=False` leaves only the OS layers (tests use it to check those alone)."""
    import secrets
    import shutil
    import tempfile

    scratch = os.path.realpath(tempfile.mkdtemp(prefix="humaneval-"))
    nonce, result = secrets.token_hex(16).encode(), b""
    nonce_read, nonce_write = os.pipe()
    result_read, result_write = os.pipe()
    try:
        os.write(nonce_write, nonce)
        os.close(nonce_write)
        with open(os.path.join(scratch, "program.py"), "w") as f:
            f.write(program)
        uid = 200_000 + 1000 * (os.getpid() % 1000) + next(_sample_uids) % 1000
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": scratch, "HOME": scratch, "PYTHONHASHSEED": "0"}
        with open(os.path.join(scratch, "output.txt"), "w+b") as output:  # a file: RLIMIT_FSIZE bounds it
            command = [sys.executable, "-I", "-B", os.path.abspath(__file__), "--sandbox", scratch, str(memory_mb),
                       str(timeout_s), str(int(python_guard)), str(uid), str(nonce_read), str(result_write),
                       ",".join(() if allow_unisolated else REQUIRED_ISOLATION)]
            process = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=output, start_new_session=True, pass_fds=(nonce_read, result_write))
            os.close(result_write)
            result_write = None
            try:  # the supervisor enforces timeout_s; this is the backstop should it hang
                code = process.wait(timeout=timeout_s + 10)
            except subprocess.TimeoutExpired:
                code = 124
            try:  # the whole session: anything left ends with it
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()
            os.set_blocking(result_read, False)
            try:
                result = os.read(result_read, 64)
            except BlockingIOError:
                pass
            output.seek(0)
            text = output.read(8192).decode(errors="replace")
        status = "passed" if result == nonce else {124: "timed out", 90: "refused"}.get(code, "failed")
        layers = text.split("\n", 1)[0].removeprefix("sandbox layers: ")  # the child's first line
        return {"status": status, "passed": status == "passed", "output": text, "layers": layers}
    finally:
        for fd in (nonce_read, result_read, result_write):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)


def missing_isolation() -> list[str]:
    """The REQUIRED_ISOLATION layers this machine cannot give the sandbox (a probe run)."""
    layers = run_program("pass\n", allow_unisolated=True)["layers"].split(",")
    return [layer for layer in REQUIRED_ISOLATION if layer not in layers]


def _sandbox(scratch: str, memory_mb: str, timeout_s: str, python_guard: str, uid: str, nonce_fd: str,
             result_fd: str, required: str = "") -> None:
    """The supervisor: namespaces, then the program's process, killed (with its namespace) at timeout_s."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    program = open(os.path.join(scratch, "program.py")).read()
    # NEWNET | NEWNS | NEWIPC | NEWPID (| NEWUSER when not root: the other namespaces need it)
    namespaces = libc.unshare(0x40000000 | 0x20000 | 0x8000000 | 0x20000000 | (0 if root else 0x10000000)) == 0
    if namespaces and not root:  # map our uid and gid to root inside the new user namespace
        outer_uid, outer_gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outer_uid} 1"), ("gid_map", f"0 {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()  # in the new PID namespace, this child is PID 1
    if pid == 0:
        _sandboxed_program(program, scratch, int(memory_mb), float(timeout_s), python_guard == "1", int(uid),
                           int(nonce_fd), int(result_fd), required.split(",") if required else [], namespaces, root,
                           libc)
    os.close(int(nonce_fd))
    os.close(int(result_fd))
    child = os.pidfd_open(pid)
    if not select.select([child], [], [], float(timeout_s))[0]:
        os.kill(pid, 9)  # PID 1 of its namespace: every process it started dies with it
        os.waitpid(pid, 0)
        os._exit(124)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) % 256)


def _sandboxed_program(program, scratch, memory_mb, timeout_s, python_guard, uid, nonce_fd, result_fd,
                       required, namespaces, root, libc) -> None:
    """PID 1 of the sample's namespace: contain this process, then run the program and echo the nonce."""
    import ctypes
    import math
    import resource

    layers = []  # `root`: started as root (not merely root inside a user namespace of our own)
    stdlib = os.path.dirname(os.__file__)
    if namespaces:
        layers.append("no-network")
        ok = libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0  # MS_REC | MS_PRIVATE: ours alone
        options = f"size={SANDBOX_DISK_MB}m,nr_inodes=1000,mode=0700" + (f",uid={uid},gid={uid}" if root else "")
        if ok and libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", 2 | 4, options.encode()) == 0:  # nosuid, nodev
            layers.append("disk-quota")
        view = os.path.join(scratch, ".stdlib")  # the stdlib, readable by the sample's uid wherever it lives
        os.mkdir(view)
        ok = ok and libc.mount(stdlib.encode(), view.encode(), None, 0x1000, None) == 0  # MS_BIND
        kept_flags = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
        for line in open("/proc/self/mountinfo"):
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # mountinfo escapes as \\040
            if ok and point != scratch.encode():
                keep = sum(kept_flags.get(option, 0) for option in fields[5].split(","))
                ok = libc.mount(None, point, None, 32 | 4096 | 1 | keep, None) == 0  # REMOUNT | BIND | RDONLY
        if ok and libc.mount(b"proc", b"/proc", b"proc", 1 | 2 | 4 | 8, None) == 0:  # this namespace's alone
            layers += ["read-only-fs", "pid-namespace"]
            sys.path = [p.replace(stdlib, view) for p in sys.path]
            stdlib = view
        os.chdir(scratch)  # the old cwd is the directory under the new mount
    # as root, become a uid of our own: it owns nothing outside the scratch dir, and RLIMIT_NPROC
    # (never applied to root) counts this sample alone. Only if the stdlib stays readable to it.
    path, reachable = stdlib, "read-only-fs" in layers or os.stat(stdlib).st_mode & 0o004
    while path != "/" and "read-only-fs" not in layers:
        reachable, path = reachable and os.stat(path).st_mode & 0o001, os.path.dirname(path)
    if root and reachable:
        os.chown(scratch, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.append("own-uid")
    elif not root and namespaces:
        layers.append("own-uid")  # a user namespace of its own
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary can raise it again
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: die with the supervisor
    if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) == 0:  # v3 header, all zero
        layers.append("no-capabilities")
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, math.ceil(timeout_s)),
                         (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    layers.append("rlimits")
    if python_guard:
        sys.addaudithook(_audit_guard(scratch))
        layers.append("audit-guard")
    print("sandbox layers:", ",".join(layers), file=sys.stderr, flush=True)
    missing = [layer for layer in required if layer not in layers]
    if missing:
        print(f"sandbox: refusing to run the program without {', '.join(missing)}", file=sys.stderr, flush=True)
        os._exit(90)
    for module in [m for m in sys.modules if m.startswith("ctypes")]:  # a new import must dlopen (refused)
        del sys.modules[module]
    pid = os.getpid()
    exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpid() == pid:  # not a forked copy that tried other answers
        os.write(result_fd, os.read(nonce_fd, 64))  # reached only when the program's last line has returned
    os._exit(0)


def _audit_guard(scratch: str):
    """A Python audit hook refusing what a HumanEval solution never needs (best effort, see above)."""
    refused = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "ctypes.", "os.symlink", "os.link", "os.chdir", "resource.")
    writes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
              "os.utime", "os.mkfifo", "os.mknod", "shutil.", "sqlite3.connect")

    def inside(path):
        return isinstance(path, int) or (os.path.abspath(os.fsdecode(path)) + os.sep).startswith(scratch + os.sep)

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path} outside the scratch directory")
        elif event.startswith(refused):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event.startswith(writes) and not all(inside(a) for a in args if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the scratch directory")
    return guard


if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox"]:
    _sandbox(*sys.argv[2:])
