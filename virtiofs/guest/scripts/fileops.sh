#!/bin/sh
# virtio-fs file-operation suite, run inside the guest by busybox ash (virtiofs.guest.suite).
#
# Backend-neutral: it only needs a vhost-user-fs device tagged $VIRTIOFS_TAG whose back-end
# exports an empty (or disposable) tree; it works under $SUITE_DIR on it.
#
# Environment (from the kernel command line, see GuestRunner.run(env=...)):
#   VIRTIOFS_TAG      device tag to mount                          (default myfs)
#   SUITE_LARGE_MIB   size of the large random file in MiB        (default 64)
#   SUITE_MANY        entries of the big directory                 (default 10000)
#   SUITE_WRITERS     concurrent writer loops                      (default 4)
#   SUITE_PER_WRITER  files (and log lines) per writer             (default 100)
#   SUITE_SEED_SHA256 sha256 of seed/host.bin written by the host before boot (optional)
#   SUITE_XATTR       "0" to skip xattr checks (back-end without xattr support)
#
# Output, one line per check, parsed by virtiofs.guest.suite.parse_suite_output:
#   OK name | FAIL name detail | SKIP name reason | INFO key value
# Exit status: the number of FAILs (at most 125).
#
# The tree it leaves under $SUITE_DIR is what FileOpsSuite.verify_host() checks on the host:
# keep the two in step when adding a check.

TAG=${VIRTIOFS_TAG:-myfs}
MNT=/mnt
D=$MNT/suite
LARGE=${SUITE_LARGE_MIB:-64}
MANY=${SUITE_MANY:-10000}
WRITERS=${SUITE_WRITERS:-4}
PER=${SUITE_PER_WRITER:-100}
fails=0

ok() { echo "OK $1"; }
fail() {
    n=$1
    shift
    # One line per FAIL whatever the command printed.
    echo "FAIL $n $(echo "$*" | tr '\n' ' ' | cut -c1-400)"
    fails=$((fails + 1))
}
skip() {
    n=$1
    shift
    echo "SKIP $n $*"
}
# check NAME FUNCTION: OK when FUNCTION returns 0, else FAIL with what it printed. Checks run in
# a subshell whose output is captured; they print INFO lines to fd 4, the console.
exec 4>&1
check() {
    if out=$("$2" 2>&1); then ok "$1"; else fail "$1" "$out"; fi
}
# eq GOT EXPECTED [WHAT]
eq() {
    [ "$1" = "$2" ] || {
        echo "${3:-value}: expected '$2', got '$1'"
        return 1
    }
}
must_fail() {
    if "$@" 2>/dev/null; then
        echo "unexpectedly succeeded: $*"
        return 1
    fi
    return 0
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now_cs() {
    # /proc/uptime in centiseconds, without forking (busybox date has no %N).
    read -r up _ </proc/uptime
    echo "${up%.*}${up#*.}"
}

t_create() {
    echo hello >$D/create.txt || return 1
    eq "$(cat $D/create.txt)" hello content
}
t_create_excl() {
    # noclobber makes ash open with O_CREAT|O_EXCL.
    if (set -C; : >$D/create.txt) 2>/dev/null; then
        echo "O_EXCL create of an existing file succeeded"
        return 1
    fi
    (set -C; echo new >$D/excl.txt) || return 1
    eq "$(cat $D/excl.txt)" new content
}
t_write() {
    printf 'alpha\nbeta\n' >$D/write.txt || return 1
    printf XY | dd of=$D/write.txt bs=1 seek=2 conv=notrunc 2>/dev/null || return 1
    eq "$(cat $D/write.txt)" "$(printf 'alXYa\nbeta')" content
}
t_read() {
    eq "$(dd if=$D/write.txt bs=1 skip=6 count=4 2>/dev/null)" beta "read at offset 6" &&
        eq "$(wc -c <$D/write.txt)" 11 "bytes read" &&
        eq "$(head -n 1 $D/write.txt)" alXYa "first line"
}
t_append() {
    echo one >$D/append.txt && echo two >>$D/append.txt && echo three >>$D/append.txt || return 1
    eq "$(cat $D/append.txt)" "$(printf 'one\ntwo\nthree')" content
}
t_truncate() {
    printf 0123456789 >$D/truncate.txt || return 1
    truncate -s 4 $D/truncate.txt || return 1
    eq "$(cat $D/truncate.txt)" 0123 "after shrink" || return 1
    truncate -s 100000 $D/truncate.txt || return 1
    eq "$(stat -c %s $D/truncate.txt)" 100000 "size after extend" || return 1
    eq "$(tr -d '\000' <$D/truncate.txt)" 0123 "extension is zeros" || return 1
    echo data >$D/trunc0.txt && : >$D/trunc0.txt || return 1
    eq "$(stat -c %s $D/trunc0.txt)" 0 "size after O_TRUNC"
}
t_rename() {
    echo r >$D/r1 && mv $D/r1 $D/r2 || return 1
    [ ! -e $D/r1 ] || { echo "r1 still exists"; return 1; }
    echo old >$D/r3 && mv $D/r2 $D/r3 || return 1
    eq "$(cat $D/r3)" r "content after rename over an existing file" || return 1
    mkdir $D/rdir && mv $D/r3 $D/rdir/r4 && mv $D/rdir $D/rdir2 || return 1
    eq "$(cat $D/rdir2/r4)" r "content after directory rename" || return 1
    [ ! -e $D/rdir ] && [ ! -e $D/r2 ] && [ ! -e $D/r3 ] || { echo "old names remain"; return 1; }
}
t_link() {
    echo L >$D/l1 && ln $D/l1 $D/l2 || return 1
    eq "$(stat -c %h $D/l1)" 2 "link count" || return 1
    eq "$(stat -c %i $D/l1)" "$(stat -c %i $D/l2)" "inode of both names" || return 1
    echo M >>$D/l2 || return 1
    eq "$(cat $D/l1)" "$(printf 'L\nM')" "content through the other name"
}
t_symlink() {
    ln -s create.txt $D/sl && ln -s /nonexistent/x $D/dangling || return 1
    eq "$(readlink $D/sl)" create.txt readlink || return 1
    eq "$(cat $D/sl)" hello "content through symlink" || return 1
    [ -L $D/dangling ] && [ ! -e $D/dangling ] || { echo "dangling symlink wrong"; return 1; }
    eq "$(stat -c %F $D/sl)" "symbolic link" "lstat type"
}
t_mkdir_rmdir() {
    mkdir -p $D/d1/d2/d3 && [ -d $D/d1/d2/d3 ] || return 1
    must_fail mkdir $D/d1 || return 1
    must_fail rmdir $D/d1 || return 1
    rmdir $D/d1/d2/d3 $D/d1/d2 $D/d1 || return 1
    [ ! -e $D/d1 ] || { echo "d1 still exists"; return 1; }
    mkdir -p $D/keepdir/sub && [ -d $D/keepdir/sub ]
}
t_chmod() {
    : >$D/mode.txt && chmod 640 $D/mode.txt || return 1
    eq "$(stat -c %a $D/mode.txt)" 640 "file mode" || return 1
    mkdir $D/modedir && chmod 1777 $D/modedir || return 1
    eq "$(stat -c %a $D/modedir)" 1777 "directory mode"
}
t_chown() {
    : >$D/own.txt && chown 1234:5678 $D/own.txt || return 1
    eq "$(stat -c %u:%g $D/own.txt)" 1234:5678 owner
}
t_utimes() {
    # The guest has no TZ: touch -d reads UTC. 2001-02-03 04:05:06 UTC = 981173106.
    : >$D/utimes.txt && touch -d '2001-02-03 04:05:06' $D/utimes.txt || return 1
    eq "$(stat -c %Y $D/utimes.txt)" 981173106 mtime || return 1
    eq "$(stat -c %X $D/utimes.txt)" 981173106 atime
}
t_unlink() {
    echo x >$D/u1 && rm $D/u1 || return 1
    [ ! -e $D/u1 ] || { echo "u1 still exists"; return 1; }
    must_fail rm $D/u1 || return 1
    # An unlinked file stays readable through a descriptor opened before.
    echo keep >$D/u2 || return 1
    exec 3<$D/u2
    rm $D/u2 || return 1
    read -r line <&3
    exec 3<&-
    eq "$line" keep "read after unlink"
}
t_readdir() {
    mkdir $D/ls.d && : >$D/ls.d/a && : >$D/ls.d/b && mkdir $D/ls.d/c || return 1
    eq "$(ls $D/ls.d | tr '\n' ' ')" "a b c " listing || return 1
    eq "$(ls -a $D/ls.d | tr '\n' ' ')" ". .. a b c " "listing with dot entries"
}
t_statfs() {
    df -k $MNT >/dev/null || return 1
    [ "$(stat -f -c %b $MNT)" -gt 0 ] || { echo "statfs reports 0 blocks"; return 1; }
}
t_fsync() {
    dd if=/dev/zero of=$D/fsync.bin bs=4k count=4 conv=fsync 2>/dev/null || return 1
    sync
    eq "$(stat -c %s $D/fsync.bin)" 16384 size
}
t_seed() {
    sum=$(sha256sum <$MNT/seed/host.bin) || return 1
    eq "${sum%% *}" "$SUITE_SEED_SHA256" "sha256 of the host-written file"
}
t_large() {
    t0=$(now_cs)
    dd if=/dev/urandom of=$D/large.bin bs=1M count=$LARGE 2>/dev/null || return 1
    t1=$(now_cs)
    eq "$(stat -c %s $D/large.bin)" $((LARGE * 1048576)) size || return 1
    s1=$(sha256sum <$D/large.bin) || return 1
    drop_caches
    t2=$(now_cs)
    s2=$(sha256sum <$D/large.bin) || return 1
    t3=$(now_cs)
    eq "${s2%% *}" "${s1%% *}" "sha256 re-read after drop_caches" || return 1
    echo >&4 "INFO large.sha256 ${s1%% *}"
    echo >&4 "INFO large.write_cs $((t1 - t0))"
    echo >&4 "INFO large.read_sha_cs $((t3 - t2))"
}
t_many() {
    mkdir $D/many || return 1
    t0=$(now_cs)
    i=0
    while [ $i -lt $MANY ]; do
        : >$D/many/f$i || return 1
        i=$((i + 1))
    done
    t1=$(now_cs)
    eq "$(ls $D/many | wc -l)" $MANY "entries (cached)" || return 1
    drop_caches
    t2=$(now_cs)
    eq "$(ls -l $D/many | grep -c '^-')" $MANY "entries after drop_caches (ls -l)" || return 1
    t3=$(now_cs)
    [ -e $D/many/f0 ] && [ -e $D/many/f$((MANY - 1)) ] && [ ! -e $D/many/f$MANY ] || {
        echo "lookup of first/last/missing entry wrong"
        return 1
    }
    echo >&4 "INFO many.create_cs $((t1 - t0))"
    echo >&4 "INFO many.ls_l_cs $((t3 - t2))"
}
t_concurrent() {
    mkdir $D/conc || return 1
    pids=""
    k=0
    while [ $k -lt $WRITERS ]; do
        (
            j=0
            while [ $j -lt $PER ]; do
                echo "w$k-$j" >$D/conc/w$k-$j || exit 1
                echo "w$k-$j" >>$D/conc/log$k || exit 1
                j=$((j + 1))
            done
        ) &
        pids="$pids $!"
        k=$((k + 1))
    done
    bad=0
    for pid in $pids; do wait $pid || bad=1; done
    [ $bad = 0 ] || { echo "a writer failed"; return 1; }
    drop_caches
    k=0
    while [ $k -lt $WRITERS ]; do
        j=0
        while [ $j -lt $PER ]; do
            read -r got <$D/conc/w$k-$j
            eq "$got" "w$k-$j" "conc/w$k-$j" || return 1
            j=$((j + 1))
        done
        eq "$(wc -l <$D/conc/log$k)" $PER "lines of conc/log$k" || return 1
        eq "$(tail -n 1 $D/conc/log$k)" "w$k-$((PER - 1))" "last line of conc/log$k" || return 1
        k=$((k + 1))
    done
}
t_xattr() {
    f=$D/xattr.txt
    : >$f || return 1
    vfs-xattr set $f user.test value1 || return 1
    eq "$(vfs-xattr get $f user.test)" value1 getxattr || return 1
    vfs-xattr list $f | grep -qx user.test || { echo "listxattr lacks user.test"; return 1; }
    err=$(vfs-xattr create $f user.test again 2>&1) && { echo "XATTR_CREATE on existing succeeded"; return 1; }
    eq "${err%% *}" EEXIST "XATTR_CREATE errno" || return 1
    vfs-xattr remove $f user.test || return 1
    err=$(vfs-xattr get $f user.test 2>&1) && { echo "getxattr after remove succeeded"; return 1; }
    eq "${err%% *}" ENODATA "getxattr errno after remove" || return 1
    vfs-xattr set $f user.keep kept
}

echo "INFO suite fileops"
echo "INFO kernel $(uname -r)"
if mount -t virtiofs "$TAG" $MNT; then ok mount; else
    fail mount "mount -t virtiofs $TAG failed"
    exit 1
fi
rm -rf $D
mkdir $D || { fail setup "mkdir $D"; exit 1; }
T0=$(now_cs)

check create t_create
check create_excl t_create_excl
check write t_write
check read t_read
check append t_append
check truncate t_truncate
check rename t_rename
check link t_link
check symlink t_symlink
check mkdir_rmdir t_mkdir_rmdir
check chmod t_chmod
check chown t_chown
check utimes t_utimes
check unlink t_unlink
check readdir t_readdir
check statfs t_statfs
check fsync t_fsync
if [ -n "$SUITE_SEED_SHA256" ]; then check seed t_seed; else skip seed "no SUITE_SEED_SHA256"; fi
check large t_large
check many t_many
check concurrent t_concurrent
if [ "${SUITE_XATTR:-1}" = 0 ]; then
    skip xattr "SUITE_XATTR=0"
elif command -v vfs-xattr >/dev/null; then
    # A back-end without xattr support answers ENOTSUP (C virtiofsd without -o xattr).
    probe=$(: >$D/.xattr-probe && vfs-xattr set $D/.xattr-probe user.probe 1 2>&1)
    rm -f $D/.xattr-probe
    case "$probe" in
    ENOTSUP* | EOPNOTSUPP*) skip xattr "back-end answers ENOTSUP" ;;
    *) check xattr t_xattr ;;
    esac
else
    skip xattr "busybox has no setfattr and /bin/vfs-xattr was not built (no C compiler)"
fi

echo "INFO suite_cs $(($(now_cs) - T0))"
cd /
sync
if umount $MNT; then ok umount; else fail umount "umount $MNT failed"; fi
echo "INFO fails $fails"
[ $fails -gt 125 ] && fails=125
exit $fails
