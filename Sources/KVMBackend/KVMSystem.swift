import CVMMSys
import Glibc
import HostSystem

/// An open /dev/kvm: API version and capability checks, and the factory for VMs.
public final class KVMSystem: Sendable {
    let fd: FileDescriptor
    public let vcpuMmapSize: Int

    public init(path: String = "/dev/kvm") throws(KVMError) {
        do { fd = try FileDescriptor(opening: path, O_RDWR) } catch {
            switch error.errno {
            case ENOENT, ENODEV, ENXIO: throw .noDevice(path)
            case EACCES, EPERM: throw .permissionDenied(path)
            case let e: throw .ioctl("open(\(path))", errno: e)
            }
        }
        let version = cvmm_ioctl_value(fd.raw, cvmm_KVM_GET_API_VERSION, 0)
        guard version == 12 else { throw .apiVersion(version) }
        let size = cvmm_ioctl_value(fd.raw, cvmm_KVM_GET_VCPU_MMAP_SIZE, 0)
        guard size > 0 else { throw .ioctl("KVM_GET_VCPU_MMAP_SIZE", errno: errno) }
        vcpuMmapSize = Int(size)
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, else the capability's value (often 1, sometimes a size).
    public func capability(_ cap: KVMCapability) -> Int32 {
        max(0, cvmm_ioctl_value(fd.raw, cvmm_KVM_CHECK_EXTENSION, UInt(cap.raw)))
    }

    /// Throws `capabilityMissing` naming the capability unless it is present.
    public func require(_ cap: KVMCapability) throws(KVMError) {
        guard capability(cap) > 0 else { throw .capabilityMissing(cap.name) }
    }

    /// Whether /dev/kvm can be opened here, and if not, why.
    public static func availability(path: String = "/dev/kvm") -> Result<Void, KVMError> {
        do { _ = try KVMSystem(path: path); return .success(()) } catch { return .failure(error) }
    }
}

/// A KVM capability, with its name for error messages.
public struct KVMCapability: Sendable, Equatable {
    public let raw: Int32
    public let name: String
    public init(raw: Int32, name: String) { self.raw = raw; self.name = name }

    public static let userMemory = KVMCapability(raw: KVM_CAP_USER_MEMORY, name: "KVM_CAP_USER_MEMORY")
    public static let manualDirtyLogProtect2 = KVMCapability(raw: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, name: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    public static let dirtyLogRing = KVMCapability(raw: KVM_CAP_DIRTY_LOG_RING, name: "KVM_CAP_DIRTY_LOG_RING")
    public static let readOnlyMemory = KVMCapability(raw: KVM_CAP_READONLY_MEM, name: "KVM_CAP_READONLY_MEM")
    public static let memslots = KVMCapability(raw: KVM_CAP_NR_MEMSLOTS, name: "KVM_CAP_NR_MEMSLOTS")
    public static let immediateExit = KVMCapability(raw: KVM_CAP_IMMEDIATE_EXIT, name: "KVM_CAP_IMMEDIATE_EXIT")
}
