//! The `collapse` stage: a cacheable miss joins the fill for its key and, unless it leads,
//! waits for the leader's outcome (a streaming head, a finished entry, a failure, or
//! "uncacheable"). A follower is served only what matches its own request's variant.

use super::*;

impl Proxy {
    /// Fetches for a cacheable request: collapsed with other requests for the same key unless
    /// the URL was recently uncacheable or the request is personal.
    pub(super) async fn fetch(
        self: &Arc<Self>,
        lookup: Lookup,
        stale: Option<Arc<Entry>>,
    ) -> Answer {
        let h = &lookup.parts.headers;
        let solo = self.store.is_hit_for_miss(lookup.hash)
            || h.contains_key(header::AUTHORIZATION)
            || lookup.forced;
        if solo {
            let fill = Arc::new(Fill::default());
            return self.lead(&lookup, fill, false, stale).await;
        }
        for _ in 0..3 {
            let (fill, leader) = self.fills.join(lookup.hash);
            if leader {
                return self.lead(&lookup, fill, true, stale).await;
            }
            let range = h.contains_key(header::RANGE);
            let (outcome, reader) = fill.wait(!lookup.head && !range).await;
            let now = SystemTime::now();
            match outcome {
                Outcome::Streaming(fhead) => {
                    if !fhead.vary.matches(h, lookup.extra.as_deref()) {
                        break;
                    }
                    if range {
                        // Ranges are cut from the stored object once it is complete.
                        if let Some(e) = self.stored_after(&fill, &lookup).await {
                            let status = self.miss_status(lookup.miss, true);
                            return (
                                self.answer_from_entry(&e, h, false, now, status),
                                Outcome_::local(CacheResult::Collapsed),
                            );
                        }
                        break;
                    }
                    let status = self.miss_status(lookup.miss, true);
                    return (
                        self.answer_from_fill(&fhead, reader, h, lookup.head, status),
                        Outcome_::local(CacheResult::Collapsed),
                    );
                }
                Outcome::Ready(entry) => {
                    // The leader's entry is for the leader's variant: a follower whose
                    // request differs in a `Vary`-ed field or the site's extra key must not
                    // get it (it would be another user's page). The leader has left the
                    // map by now: joining again leads (or follows) a fill for our variant.
                    if !entry.vary.matches(h, lookup.extra.as_deref()) {
                        continue;
                    }
                    let status = if stale.is_some() {
                        self.cache_status("fwd=stale; collapsed")
                    } else {
                        self.miss_status(lookup.miss, true)
                    };
                    return (
                        self.answer_from_entry(&entry, h, lookup.head, now, status),
                        Outcome_::local(CacheResult::Collapsed),
                    );
                }
                Outcome::Failed(error) => {
                    if let Some(resp) =
                        self.stale_on_error(stale.as_ref(), error, true, h, lookup.head)
                    {
                        return (resp, Outcome_::local(CacheResult::Stale));
                    }
                    return (respond::error(error), Outcome_::local(CacheResult::Error));
                }
                Outcome::Uncacheable => break,
                Outcome::Retry | Outcome::Pending => continue,
            }
        }
        let fill = Arc::new(Fill::default());
        let lookup = Lookup {
            ignore_range: true,
            ..lookup
        };
        self.lead(&lookup, fill, false, stale).await
    }
}
