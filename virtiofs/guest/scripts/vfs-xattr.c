/* vfs-xattr: the extended-attribute calls busybox lacks (it has no setfattr/getfattr).
 *
 * Compiled statically on the host by virtiofs.guest.initramfs when a C compiler is present and
 * copied into the guest initramfs as /bin/vfs-xattr; the file-operation suite skips its xattr
 * checks when it is absent.
 *
 *   vfs-xattr set FILE NAME VALUE      setxattr(2)
 *   vfs-xattr create FILE NAME VALUE   setxattr(2) with XATTR_CREATE
 *   vfs-xattr get FILE NAME            getxattr(2), value on stdout (no newline)
 *   vfs-xattr list FILE                listxattr(2), one name per line
 *   vfs-xattr remove FILE NAME         removexattr(2)
 *
 * Exit status 0 on success; otherwise 1 and "ERRNONAME message" on stderr so the suite can
 * compare errno values (e.g. ENODATA, EEXIST).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>

static const char *errname(int e)
{
    switch (e) {
    case ENODATA: return "ENODATA";
    case EEXIST: return "EEXIST";
    case ENOTSUP: return "ENOTSUP";
    case ERANGE: return "ERANGE";
    case ENOENT: return "ENOENT";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOSYS: return "ENOSYS";
    case E2BIG: return "E2BIG";
    default: return "EOTHER";
    }
}

static int fail(const char *what)
{
    int e = errno;
    fprintf(stderr, "%s %s: %s\n", errname(e), what, strerror(e));
    return 1;
}

int main(int argc, char **argv)
{
    static char buf[65536];
    ssize_t n;

    if (argc == 5 && strcmp(argv[1], "set") == 0) {
        if (setxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0) != 0)
            return fail("setxattr");
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "create") == 0) {
        if (setxattr(argv[2], argv[3], argv[4], strlen(argv[4]), XATTR_CREATE) != 0)
            return fail("setxattr");
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "get") == 0) {
        n = getxattr(argv[2], argv[3], buf, sizeof buf);
        if (n < 0)
            return fail("getxattr");
        fwrite(buf, 1, (size_t)n, stdout);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "list") == 0) {
        n = listxattr(argv[2], buf, sizeof buf);
        if (n < 0)
            return fail("listxattr");
        for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1)
            printf("%s\n", buf + i);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "remove") == 0) {
        if (removexattr(argv[2], argv[3]) != 0)
            return fail("removexattr");
        return 0;
    }
    fprintf(stderr, "usage: vfs-xattr set|create FILE NAME VALUE | get FILE NAME | "
                    "list FILE | remove FILE NAME\n");
    return 2;
}
