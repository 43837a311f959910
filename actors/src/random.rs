//! Random identifiers from the thread's CSPRNG (rand's `ThreadRng`: ChaCha, seeded and reseeded
//! from the OS) rather than a `getrandom` system call per identifier, which `Uuid::new_v4` makes:
//! the job path made about four per job (the job id, trace and span ids), more system calls than
//! it made writes to NATS.

/// A random (version 4) UUID.
pub fn uuid_v4() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// A W3C trace id: 32 lowercase hex digits, never all zeros.
pub fn trace_id() -> String {
    format!("{:032x}", rand::random::<u128>().max(1))
}

/// A W3C span id: 16 lowercase hex digits, never all zeros.
pub fn span_id() -> String {
    format!("{:016x}", rand::random::<u64>().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_and_differ() {
        let (a, b) = (uuid_v4(), uuid_v4());
        assert_eq!(a.get_version(), Some(uuid::Version::Random));
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 36);
    }

    #[test]
    fn trace_and_span_ids_are_lowercase_hex_of_their_length() {
        for _ in 0..1000 {
            let (t, s) = (trace_id(), span_id());
            assert_eq!((t.len(), s.len()), (32, 16));
            assert!(t.bytes().chain(s.bytes()).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(t.bytes().any(|b| b != b'0') && s.bytes().any(|b| b != b'0'));
        }
        assert_ne!(trace_id(), trace_id());
    }
}
