//! CPUID for each vCPU: KVM's supported set, made consistent with the topology we
//! present (one socket, `vcpu_count` cores, one thread per core, APIC id = vCPU index).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// CPUID leaves and bits we edit (Intel SDM vol. 2A "CPUID"; AMD APM vol. 3 E.3/E.4).
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDENTIFIERS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 EBX: [31:24] initial APIC id, [23:16] logical processors per package,
/// [15:8] CLFLUSH line size in qwords.
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_CLFLUSH_SHIFT: u32 = 8;
const CLFLUSH_LINE_QWORDS: u32 = 8; // 64 bytes
/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: the package has more than one logical processor.
const EDX_HTT: u32 = 1 << 28;

/// Leaf 4 EAX [31:26]: cores per package - 1; [25:14]: threads sharing the cache - 1.
const EAX_CORES_PER_PACKAGE_SHIFT: u32 = 26;
const EAX_CACHE_SHARING_SHIFT: u32 = 14;
const EAX_CACHE_SHARING_MASK: u32 = 0xfff << EAX_CACHE_SHARING_SHIFT;
/// Leaf 4 EAX [7:5]: cache level.
const EAX_CACHE_LEVEL_SHIFT: u32 = 5;

/// Leaf 0xb/0x1f ECX [15:8]: level type.
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
const TOPOLOGY_LEVEL_TYPE_SHIFT: u32 = 8;

/// Leaf 0x8000_0008 ECX: [7:0] cores - 1, [15:12] APIC id bits for the core id.
const AMD_APIC_ID_SIZE_SHIFT: u32 = 12;

/// Bits needed to number `count` cores (the APIC id shift of the core level).
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u32, count: u32) {
    let apic_id = index;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (apic_id << EBX_APIC_ID_SHIFT)
                    | (count << EBX_LOGICAL_COUNT_SHIFT)
                    | (CLFLUSH_LINE_QWORDS << EBX_CLFLUSH_SHIFT);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Each core has its own caches up to L2; the L3 is shared by all.
                let level = (entry.eax >> EAX_CACHE_LEVEL_SHIFT) & 0b111;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax =
                    (entry.eax & !EAX_CACHE_SHARING_MASK & !(0x3f << EAX_CORES_PER_PACKAGE_SHIFT))
                        | (sharing << EAX_CACHE_SHARING_SHIFT);
                if entry.eax & 0x1f != 0 {
                    // A valid cache descriptor (type != 0) gets the core count.
                    entry.eax |= (count - 1) << EAX_CORES_PER_PACKAGE_SHIFT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                set_topology_level(entry, apic_id, count);
            }
            LEAF_AMD_SIZE_IDENTIFIERS => {
                entry.ecx = (id_bits(count) << AMD_APIC_ID_SIZE_SHIFT) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                // EAX: extended APIC id; EBX: core id, one thread per core;
                // ECX: node 0, one node per package.
                entry.eax = apic_id;
                entry.ebx = apic_id;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

/// One sub-leaf of the extended topology leaves: SMT level (1 thread per core), core
/// level (`count` cores), then the terminating invalid level.
fn set_topology_level(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    entry.edx = apic_id;
    let subleaf = entry.index;
    let (shift, logical, level_type) = match subleaf {
        0 => (0, 1, TOPOLOGY_LEVEL_SMT),
        1 => (id_bits(count), count, TOPOLOGY_LEVEL_CORE),
        _ => (0, 0, 0),
    };
    entry.eax = shift;
    entry.ebx = logical;
    entry.ecx = (level_type << TOPOLOGY_LEVEL_TYPE_SHIFT) | (subleaf & 0xff);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(LEAF_FEATURES, 0),
            leaf(LEAF_EXT_TOPOLOGY, 0),
            leaf(LEAF_EXT_TOPOLOGY, 1),
            leaf(LEAF_EXT_TOPOLOGY, 2),
            leaf(LEAF_AMD_SIZE_IDENTIFIERS, 0),
        ])
        .unwrap();
        normalize(&mut cpuid, 2, 3);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8, e[1].edx), (1, 1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, 2));
        assert_eq!((e[3].ebx, e[3].ecx), (0, 2));
        assert_eq!(e[4].ecx & 0xff, 2);
    }
}
