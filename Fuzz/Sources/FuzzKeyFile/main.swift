import Foundation
import FuzzSupport
import Glibc
import Migration

// A key file as `--key-file FILE` reads it: a private regular file of at least 16 bytes.

private let path = NSTemporaryDirectory() + "vmm-fuzz-key-\(getpid())"

runFuzzer { data, size in
    guard let data else { return 0 }
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    precondition(fd >= 0)
    _ = write(fd, data, size)
    close(fd)
    do { _ = try MigrationKey(file: path) } catch { _ = "\(error)" }
    return 0
}
