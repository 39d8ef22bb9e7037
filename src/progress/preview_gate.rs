//! Which of ComfyUI's previews a job relays: at most so many a second, and none larger than
//! the caps ([`PreviewPolicy`]). ComfyUI sends one per sampler step (as fast as the GPU steps);
//! a client wants to see the image form, not every frame of it.

use std::time::{Duration, Instant};

use crate::config::PreviewPolicy;

/// Why a preview was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewRefusal {
    /// Previews are off (`PREVIEW_MAX_PER_S=0`).
    Off,
    /// Sooner after the last relayed one than the rate allows.
    TooSoon,
    /// More bytes than `PREVIEW_MAX_BYTES`.
    TooLarge,
    /// A side longer than `PREVIEW_MAX_SIDE`.
    TooWide,
    /// Not a JPEG, PNG or WebP image whose size can be read.
    Unreadable,
}

/// One job's gate.
#[derive(Debug, Clone)]
pub struct PreviewGate {
    policy: PreviewPolicy,
    last: Option<Instant>,
}

impl PreviewGate {
    /// A gate that has relayed nothing yet.
    pub fn new(policy: PreviewPolicy) -> PreviewGate {
        PreviewGate { policy, last: None }
    }

    /// Whether the preview `data`, arriving at `now`, is relayed; when it is, its width and
    /// height.
    pub fn admit(&mut self, now: Instant, data: &[u8]) -> Result<(u32, u32), PreviewRefusal> {
        let rate = self.policy.max_per_second;
        if rate <= 0.0 {
            return Err(PreviewRefusal::Off);
        }
        if data.len() > self.policy.max_bytes {
            return Err(PreviewRefusal::TooLarge);
        }
        let size = imagesize::blob_size(data).map_err(|_| PreviewRefusal::Unreadable)?;
        let (width, height) = (size.width as u32, size.height as u32);
        if width.max(height) > self.policy.max_side {
            return Err(PreviewRefusal::TooWide);
        }
        let interval = Duration::from_secs_f64((1.0 / rate).min(3600.0));
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < interval)
        {
            return Err(PreviewRefusal::TooSoon);
        }
        self.last = Some(now);
        Ok((width, height))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG header of `w`×`h` (enough for its size to be read).
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    fn gate(max_per_second: f64) -> PreviewGate {
        PreviewGate::new(PreviewPolicy {
            max_per_second,
            max_bytes: 1000,
            max_side: 512,
            runpod: false,
        })
    }

    #[test]
    fn at_most_the_rate_and_the_first_at_once() {
        let mut g = gate(2.0);
        let t0 = Instant::now();
        assert_eq!(g.admit(t0, &png(64, 48)), Ok((64, 48)));
        let soon = t0 + Duration::from_millis(499);
        assert_eq!(g.admit(soon, &png(64, 48)), Err(PreviewRefusal::TooSoon));
        assert_eq!(
            g.admit(t0 + Duration::from_millis(500), &png(64, 48)),
            Ok((64, 48))
        );
    }

    #[test]
    fn caps_and_off() {
        let mut g = gate(1000.0);
        let t = Instant::now();
        assert_eq!(g.admit(t, &png(513, 10)), Err(PreviewRefusal::TooWide));
        assert_eq!(g.admit(t, &[0u8; 1001]), Err(PreviewRefusal::TooLarge));
        assert_eq!(g.admit(t, b"not an image"), Err(PreviewRefusal::Unreadable));
        assert_eq!(g.admit(t, &png(512, 512)), Ok((512, 512)));
        assert_eq!(gate(0.0).admit(t, &png(8, 8)), Err(PreviewRefusal::Off));
    }
}
