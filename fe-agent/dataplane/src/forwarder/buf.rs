//! A packet buffer with a logical length over fixed storage: reused across batches without
//! re-zeroing, and growable by tun-rs when it coalesces segments (GRO) into it.

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

impl tun_rs::ExpandBuffer for PacketBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.data.len() {
            self.data.resize(new_len, value);
        }
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tun_rs::ExpandBuffer;

    #[test]
    fn logical_length_and_growth() {
        let mut b = PacketBuf::new(8);
        b.storage_mut()[..3].copy_from_slice(&[1, 2, 3]);
        b.set_len(3);
        assert_eq!(b.as_ref(), &[1, 2, 3]);
        b.buf_extend_from_slice(&[4; 7]);
        assert_eq!(b.as_ref().len(), 10);
        assert_eq!(b.buf_capacity(), 10);
        b.buf_resize(2, 0);
        b.buf_resize(4, 9);
        assert_eq!(b.as_ref(), &[1, 2, 9, 9]);
    }
}
