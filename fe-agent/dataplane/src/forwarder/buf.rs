//! A packet buffer with a logical length over fixed storage, reused across batches without
//! re-zeroing.

/// Storage plus the length of the packet currently in it (`AsRef` shows only that part).
pub(crate) struct PacketBuf {
    data: Vec<u8>,
    len: usize,
}

impl PacketBuf {
    /// A zeroed buffer of `capacity` bytes, full length.
    pub(crate) fn new(capacity: usize) -> Self {
        PacketBuf { data: vec![0; capacity], len: capacity }
    }

    /// All the storage, to receive into.
    pub(crate) fn storage_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Sets the logical length (≤ storage).
    pub(crate) fn set_len(&mut self, len: usize) {
        assert!(len <= self.data.len(), "PacketBuf length beyond storage");
        self.len = len;
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_length() {
        let mut b = PacketBuf::new(8);
        b.storage_mut()[..3].copy_from_slice(&[1, 2, 3]);
        b.set_len(3);
        assert_eq!(b.as_ref(), &[1, 2, 3]);
        b.as_mut()[0] = 9;
        assert_eq!(b.as_ref(), &[9, 2, 3]);
    }
}
