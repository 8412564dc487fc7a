//! Stop strings over streamed text: emits text as soon as it cannot be the
//! start of a stop string, holds back the rest, and cuts at the first stop
//! string found (which is not emitted, as in OpenAI's API).

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text safe to send; generation goes on.
    Text(String),
    /// A stop string was found: the final text before it.
    Stopped(String),
}

#[derive(Debug, Default, Clone)]
pub struct StopText {
    /// Shared by every choice of a request.
    stops: std::sync::Arc<[String]>,
    held: String,
}

impl StopText {
    pub fn new(stops: std::sync::Arc<[String]>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Piece {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return Piece::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in self.stops.iter() {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Piece::Text(out)
    }

    /// Text still held at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_stops_passes_through() {
        let mut s = StopText::new(vec![].into());
        assert_eq!(s.push("abc"), Piece::Text("abc".into()));
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_cut_and_not_emitted() {
        let mut s = StopText::new(vec!["END".into()].into());
        assert_eq!(s.push("hello E"), Piece::Text("hello ".into()));
        assert_eq!(s.push("N"), Piece::Text("".into()));
        assert_eq!(s.push("D tail"), Piece::Stopped("".into()));
    }

    #[test]
    fn held_text_that_was_not_a_stop_is_released() {
        let mut s = StopText::new(vec!["END".into()].into());
        assert_eq!(s.push("E"), Piece::Text("".into()));
        assert_eq!(s.push("Xy"), Piece::Text("EXy".into()));
        let mut s = StopText::new(vec!["\n\n".into()].into());
        assert_eq!(s.push("a\n"), Piece::Text("a".into()));
        assert_eq!(s.flush(), "\n");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut s = StopText::new(vec!["b".into(), "a".into()].into());
        assert_eq!(s.push("xxaxb"), Piece::Stopped("xx".into()));
    }
}
