//! Which kind of /dev/kvm this machine has.

use std::path::Path;

/// True when /dev/kvm is hardware virtualization (the CPU shows vmx or svm
/// and the PVM module is not what provides KVM). There tvix-boot can boot
/// Linux directly; on the PVM machines the project builds on it cannot, and
/// end-to-end tests go through [`crate::TestHost`].
pub fn hardware_kvm_available() -> bool {
    if !Path::new("/dev/kvm").exists() || Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|cpuinfo| cpuinfo_has_hw_virt(&cpuinfo))
        .unwrap_or(false)
}

fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_matched_as_words() {
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu svm lm\n"));
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpuinfo_has_hw_virt("flags\t\t: fpu svm_lock\n"));
        assert!(!cpuinfo_has_hw_virt("model name : svm\n"));
    }
}
