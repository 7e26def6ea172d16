//! A PNG encoder for the demo's picture: 8-bit RGB, no interlace, the image data in stored
//! (uncompressed) deflate blocks.
//!
//! Written here rather than taken from the `png` crate: that crate brings a deflate encoder,
//! `crc32fast`, `fdeflate` and `flate2` into the lock file for one generated picture, while
//! stored blocks need only CRC-32 (chunks) and Adler-32 (the zlib stream), a few lines each.
//! The file is as large as the pixels (about 3 bytes each), which is what the demo wants: an
//! image-sized object that a browser renders.

/// The eight bytes every PNG file starts with (PNG §5.2).
pub(crate) const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// A stored deflate block holds at most this many bytes (RFC 1951 §3.2.4: LEN is 16 bits).
const STORED_MAX: usize = 65_535;

/// Encodes `rgb` (rows top to bottom, 3 bytes per pixel, `width * height * 3` bytes) as a
/// PNG file. `None` when the sizes do not agree or are zero.
pub(crate) fn encode_rgb(width: u32, height: u32, rgb: &[u8]) -> Option<Vec<u8>> {
    let row = usize::try_from(width).ok()?.checked_mul(3)?;
    let rows = usize::try_from(height).ok()?;
    if row == 0 || rows == 0 || row.checked_mul(rows)? != rgb.len() {
        return None;
    }
    // Scanlines: a filter-type byte (0, none) before each row (PNG §9.2).
    let raw_len = (row + 1) * rows;
    let mut raw = Vec::with_capacity(raw_len);
    for line in rgb.chunks_exact(row) {
        raw.push(0);
        raw.extend_from_slice(line);
    }

    // The zlib stream (RFC 1950): header, stored blocks, Adler-32 of the uncompressed bytes.
    let blocks = raw_len.div_ceil(STORED_MAX);
    let mut zlib = Vec::with_capacity(2 + raw_len + 5 * blocks + 4);
    // CMF 0x78: deflate, 32 KiB window; FLG 0x01: no dictionary, fastest level, and
    // CMF * 256 + FLG a multiple of 31.
    zlib.extend_from_slice(&[0x78, 0x01]);
    let mut chunks = raw.chunks(STORED_MAX).peekable();
    while let Some(block) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        // BFINAL in bit 0, BTYPE 00 (stored) in bits 1-2; then LEN and its complement.
        let len = block.len() as u16;
        zlib.push(last);
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (truecolour), compression 0, filter 0, interlace 0.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut out = Vec::with_capacity(SIGNATURE.len() + 3 * 12 + ihdr.len() + zlib.len());
    out.extend_from_slice(&SIGNATURE);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    Some(out)
}

/// Appends one chunk: length, type, data, CRC-32 of type and data (PNG §5.3).
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    // Chunk data is below 2^31 bytes here: the demo's picture is a few MiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 as PNG and zlib's `crc32` compute it (reflected polynomial 0xEDB88320).
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The byte-at-a-time table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// Adler-32 (RFC 1950 §8.2).
pub(crate) fn adler32(bytes: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the longest run whose sums cannot overflow 32 bits before the modulo.
    for run in bytes.chunks(5552) {
        for &x in run {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_reference_values() {
        // The check value of CRC-32/ISO-HDLC, and Adler-32's example from its definition.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(&[0xff; 100_000]), {
            let (mut a, mut b) = (1u64, 0u64);
            for _ in 0..100_000 {
                a = (a + 255) % 65_521;
                b = (b + a) % 65_521;
            }
            ((b << 16) | a) as u32
        });
    }

    #[test]
    fn a_one_pixel_image_has_the_known_layout() {
        let png = encode_rgb(1, 1, &[255, 0, 0]).expect("sizes agree");
        assert_eq!(&png[..8], &SIGNATURE);
        // IHDR: length 13, then width 1, height 1, depth 8, colour type 2.
        assert_eq!(&png[8..16], b"\0\0\0\x0dIHDR");
        assert_eq!(&png[16..29], &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        assert!(encode_rgb(2, 2, &[0; 11]).is_none());
        assert!(encode_rgb(0, 0, &[]).is_none());
    }
}
