import Foundation
import FuzzSupport
import Glibc
@testable import Control
import Migration

// A control-socket client's bytes, served as the server serves a connection: framing, JSON, the
// QMP envelope and each command's arguments, run by a real VM manager. It waits for an incoming
// migration (on a socket nobody connects to), so commands that would act on a guest are checked and
// refused rather than writing snapshots or connecting anywhere; `quit` is real, and a fresh
// manager replaces one that quit. The first input byte: bit 0 starts the client negotiated.

private let dir = NSTemporaryDirectory() + "vmm-fuzz-control-\(getpid())"
nonisolated(unsafe) private var generation = 0
nonisolated(unsafe) private var served: (vm: ManagedVM, server: ControlServer) = fresh()

private func fresh() -> (ManagedVM, ControlServer) {
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    generation += 1
    let listener = try! Listener(.unix(path: "\(dir)/in-\(generation)"))
    let vm = ManagedVM(incoming: listener, options: ReceiveOptions(timeout: 1, acceptTimeout: 3600))
    return (vm, try! ControlServer(path: "\(dir)/api-\(generation)", handler: vm, version: "fuzz"))
}

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    if served.vm.status == .shutdown {
        served.server.stop()
        served = fresh()
    }
    var fds: [Int32] = [0, 0]
    precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
    var big: Int32 = 4 << 20
    for fd in fds { setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, socklen_t(4)); setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, socklen_t(4)) }
    _ = send(fds[0], data + 1, size - 1, Int32(MSG_NOSIGNAL))
    shutdown(fds[0], Int32(SHUT_WR))
    let client = ControlServer.Client(fd: fds[1])
    client.negotiated = data[0] & 1 != 0
    served.server.serve(client)
    close(fds[0])
    return 0
}
