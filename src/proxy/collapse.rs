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
                Outcome::Failed {
                    status: code,
                    unreachable,
                } => {
                    if let Some(s) = stale.as_ref().filter(|s| s.usable_if_error(now)) {
                        let status = self.cache_status(&format!(
                            "hit; fwd=stale; fwd-status={}; collapsed; detail=stale-if-error",
                            code.as_u16()
                        ));
                        return (
                            self.answer_from_entry(s, h, lookup.head, now, status),
                            Outcome_::local(CacheResult::Stale),
                        );
                    }
                    if let Some(s) = stale
                        .as_ref()
                        .filter(|s| unreachable && s.usable_when_disconnected())
                    {
                        let status = self.cache_status(&format!(
                            "hit; fwd=stale; fwd-status={}; collapsed; detail=origin-unreachable",
                            code.as_u16()
                        ));
                        return (
                            self.answer_from_entry(s, h, lookup.head, now, status),
                            Outcome_::local(CacheResult::Stale),
                        );
                    }
                    let msg = if code == StatusCode::GATEWAY_TIMEOUT {
                        "edgecache: the origin did not answer in time\n"
                    } else {
                        "edgecache: the origin failed to answer\n"
                    };
                    return (
                        respond::simple(code, msg, false),
                        Outcome_::local(CacheResult::Error),
                    );
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
