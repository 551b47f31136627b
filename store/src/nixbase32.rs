//! Nix's base32: a custom alphabet, and the bytes are read from the end.
//!
//! Written here rather than taken from a crate: it is 40 lines, the only crate for it
//! (nix-base32 0.2) has no decoder that rejects non-canonical input, and store paths must
//! round-trip exactly.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why text is not the nixbase32 encoding of the number of bytes asked for.
#[derive(Debug, Error, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum Nixbase32Error {
    /// A character outside the alphabet.
    #[error("invalid nixbase32 character {0:?}")]
    InvalidCharacter(char),
    /// Not the length that encodes that many bytes.
    #[error("nixbase32 string {input:?} has length {len}, expected {expected}")]
    WrongLength {
        input: String,
        len: usize,
        expected: usize,
    },
    /// Padding bits set: no bytes encode to this text.
    #[error("nixbase32 string {0:?} is not canonical (non-zero padding bits)")]
    NonCanonical(String),
}

/// Length of the nixbase32 encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    (len * 8).div_ceil(5)
}

/// `bytes` in nixbase32, as Nix prints hashes in store paths and narinfos.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = (bytes[i] as u16) >> j;
        let high = bytes.get(i + 1).map_or(0, |b| (*b as u16) << (8 - j));
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decode `input` into exactly `out_len` bytes.
pub fn decode(input: &str, out_len: usize) -> Result<Vec<u8>, Nixbase32Error> {
    let expected = encoded_len(out_len);
    if input.len() != expected {
        return Err(Nixbase32Error::WrongLength {
            input: input.to_owned(),
            len: input.len(),
            expected,
        });
    }
    let mut out = vec![0u8; out_len];
    for (n, c) in input.bytes().rev().enumerate() {
        let digit = ALPHABET
            .iter()
            .position(|a| *a == c)
            .ok_or(Nixbase32Error::InvalidCharacter(c as char))? as u16;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => return Err(Nixbase32Error::NonCanonical(input.to_owned())),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // `nix-hash --type sha256 --to-base32` of the all-zero and the empty-string hashes.
        assert_eq!(encode(&[0u8; 20]), "00000000000000000000000000000000");
        let sha256_empty = data_encoding::HEXLOWER
            .decode(b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&sha256_empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", 32).unwrap(),
            sha256_empty
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            decode("e", 1),
            Err(Nixbase32Error::WrongLength { .. })
        ));
        assert!(matches!(
            decode("0e", 1),
            Err(Nixbase32Error::InvalidCharacter('e'))
        ));
        // 2 chars hold 10 bits; a 1-byte value may only use the low 8.
        assert!(matches!(
            decode("z0", 1),
            Err(Nixbase32Error::NonCanonical(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn roundtrip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            proptest::prop_assert_eq!(decode(&encode(&bytes), bytes.len()).unwrap(), bytes);
        }
    }
}
